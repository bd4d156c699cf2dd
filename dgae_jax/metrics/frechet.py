"""Frechet distance between feature statistics, and k-NN precision / recall.

Statistics are the mean, covariance and count of a set's features; they are computed once (in
float64) and saved as `.npz` (`save_stats`), so a reference set such as the ImageNet training
split is processed only once. The file layout is ADM's (guided-diffusion's
`evaluations/evaluator.py`, whose `read_statistics` reads `mu`, `sigma`, `mu_s`, `sigma_s`) plus
our counts, so ADM's reference batches (e.g. `VIRTUAL_imagenet256_labeled.npz`) load here and our
statistics load there.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    mu: np.ndarray  # (d,)
    sigma: np.ndarray  # (d, d)
    # How many feature vectors the statistics summarise; None when unknown (ADM's reference
    # batches store no count). Nothing may substitute a guess: check for None before using it.
    count: int | None

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FeatureStats":
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"need at least 2 feature vectors of shape (n, d), got {f.shape}")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), len(f))


# Keys of each statistics kind: (mu, sigma, count) as written, then older spellings still read.
# ADM's evaluator reads exactly `mu`, `sigma`, `mu_s`, `sigma_s`; the counts are ours.
_KEYS = {"pool": [("mu", "sigma", "count")],
         "spatial": [("mu_s", "sigma_s", "count_s"),
                     ("spatial_mu", "spatial_sigma", "spatial_count")]}  # before ADM's names


def save_stats(path: str | os.PathLike, stats: dict[str, FeatureStats]) -> None:
    """One `.npz` of a set's statistics, in ADM's layout: `mu`, `sigma` (pool) and, when given,
    `mu_s`, `sigma_s` (spatial), each float64; plus our `count` / `count_s` when known (a
    statistic of unknown count, e.g. loaded from an ADM file, is saved without one).

    ADM's `read_statistics` needs the spatial pair whenever `mu` is present, so statistics meant
    for its evaluator must include 'spatial' (those of `FeatureCollector.stats()` do).
    """
    unknown = set(stats) - set(_KEYS)
    if unknown or "pool" not in stats:
        raise ValueError(f"statistics must be 'pool' (+ 'spatial'), got {sorted(stats)}")
    arrays = {}
    for name, s in stats.items():
        mu, sigma, count = _KEYS[name][0]
        arrays.update({mu: np.asarray(s.mu, np.float64), sigma: np.asarray(s.sigma, np.float64)})
        if s.count is not None:
            arrays[count] = np.int64(s.count)
    np.savez(path, **arrays)


def load_stats(path: str | os.PathLike) -> dict[str, FeatureStats]:
    """'pool' (always) and 'spatial' (if present) statistics of an `.npz`: one written by
    `save_stats`, an older one with `spatial_*` keys, or an ADM reference batch (`mu`, `sigma`,
    `mu_s`, `sigma_s`, no count: count None). Other keys (ADM's `arr_0` images) are ignored."""
    name_of = getattr(path, "name", path)
    with np.load(path) as data:
        files = set(data.files)
        missing = {"mu", "sigma"} - files
        if missing:
            raise ValueError(f"{name_of} is not a statistics file: missing {sorted(missing)}")
        out = {}
        for name, spellings in _KEYS.items():
            for mu, sigma, count in spellings:
                if mu not in files and sigma not in files:
                    continue
                if mu not in files or sigma not in files:
                    raise ValueError(f"{name_of}: {mu!r} and {sigma!r} must come together")
                m, s = data[mu].astype(np.float64), data[sigma].astype(np.float64)
                if m.ndim != 1 or s.shape != (len(m), len(m)):
                    raise ValueError(f"{name_of}: {mu!r} {m.shape} and {sigma!r} {s.shape} are "
                                     "not a (d,) mean and (d, d) covariance")
                out[name] = FeatureStats(m, s, int(data[count]) if count in files else None)
                break
        return out


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    tr (S_a S_b)^(1/2) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S_a^(1/2) S_b S_a^(1/2) (same spectrum), which stays real and stable for
    near-singular covariances where a general `sqrtm` returns complex round-off.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature sizes differ: {a.mu.shape} vs {b.mu.shape}")
    root = _psd_sqrt(a.sigma)
    cross = np.linalg.eigvalsh(root @ b.sigma @ root)
    trace_sqrt = np.sum(np.sqrt(np.clip(cross, 0, None)))
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt)


def _pairwise(a: jax.Array, b: jax.Array) -> jax.Array:
    sq = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None] - 2 * a @ b.T
    return jnp.maximum(sq, 0.0)


@jax.jit
def _covered(queries: jax.Array, centres: jax.Array, radii: jax.Array) -> jax.Array:
    """Whether each query lies in at least one ball (centre, radius)."""
    return jnp.any(_pairwise(queries, centres) <= radii[None] ** 2, axis=1)


@functools.partial(jax.jit, static_argnames=("k",))
def _kth_neighbour_radii(rows: jax.Array, points: jax.Array, k: int) -> jax.Array:
    """For each row (a member of `points`), the distance to its k-th nearest other point."""
    smallest = -jax.lax.top_k(-_pairwise(rows, points), k + 1)[0]  # [:, 0] is the row itself
    return jnp.sqrt(smallest[:, k])


def _manifold_coverage(queries, centres, k: int, block: int) -> float:
    """Fraction of queries inside the k-NN manifold of the centres, in row blocks."""
    centres = jnp.asarray(centres, jnp.float32)
    radii = jnp.concatenate([_kth_neighbour_radii(centres[i:i + block], centres, k)
                             for i in range(0, len(centres), block)])
    hits = [_covered(jnp.asarray(queries[i:i + block], jnp.float32), centres, radii)
            for i in range(0, len(queries), block)]
    return float(jnp.mean(jnp.concatenate(hits)))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Precision: the fraction of fake features inside the real manifold, the union of balls around
    each real feature reaching its k-th nearest real neighbour; recall: the same with the roles
    swapped. Distances are computed in row blocks: each holds a block x N float32 matrix
    (200 MB for the default 1024 rows against N = 50,000 features).
    """
    return (_manifold_coverage(fake, real, k, block), _manifold_coverage(real, fake, k, block))


def compare(a: dict[str, FeatureStats], b: dict[str, FeatureStats],
            pool_a: np.ndarray | None = None, pool_b: np.ndarray | None = None,
            k: int = 3) -> dict[str, float]:
    """FID of two sets (a = reference), sFID when both have spatial statistics, and precision
    / recall of b against a when both sets' pool features are given."""
    out = {"fid": frechet_distance(a["pool"], b["pool"])}
    if "spatial" in a and "spatial" in b:
        out["sfid"] = frechet_distance(a["spatial"], b["spatial"])
    if pool_a is not None and pool_b is not None:
        out["precision"], out["recall"] = precision_recall(pool_a, pool_b, k=k)
    return out
