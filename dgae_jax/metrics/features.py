"""Inception features of image streams: jitted, split over the mesh, collected on the host.

The network runs on global batches sharded over the mesh's batch axes (each device embeds its
own images); only the 2048-d pool features and the 2023-d sFID features come back to the host,
so a 50k-image evaluation never holds more than one batch of images. Padding rows (mask False)
are dropped before anything is kept, so every real image counts exactly once.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from dgae_jax import parallel
from dgae_jax.metrics.frechet import FeatureStats
from dgae_jax.models import inception


class InceptionFeatures:
    """`extractor(images)` -> {'pool', 'spatial'} global arrays for a sharded uint8 batch."""

    def __init__(self, mesh: jax.sharding.Mesh, weights: dict):
        """`weights`: from `inception.load_weights`."""
        self.mesh = mesh
        self.weights = jax.device_put(weights, parallel.replicated(mesh))
        self._apply = jax.jit(inception.features, out_shardings=parallel.batch_sharding(mesh))

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        return self._apply(self.weights, images)


class FeatureCollector:
    """Host copies of the features of the real (mask True) rows of each batch, in order."""

    def __init__(self):
        self._parts: dict[str, list[np.ndarray]] = {}

    def add(self, features: dict[str, jax.Array], mask: jax.Array) -> None:
        keep = np.asarray(multihost_utils.process_allgather(mask, tiled=True)).astype(bool)
        for name, value in features.items():
            host = np.asarray(multihost_utils.process_allgather(value, tiled=True))
            self._parts.setdefault(name, []).append(host[keep])

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts.get("pool", []))

    def array(self, name: str = "pool") -> np.ndarray:
        return np.concatenate(self._parts[name])

    def stats(self) -> dict[str, FeatureStats]:
        return {name: FeatureStats.from_features(self.array(name)) for name in self._parts}
