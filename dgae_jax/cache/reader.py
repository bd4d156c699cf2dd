"""Reading a latent cache back (format.py has the files): the grain source and the op that turns a
stored posterior into a normalised latent, what the DiT trains on. Imports no jax: it runs in
grain workers.
"""

from __future__ import annotations

import dataclasses
import os

import grain
import numpy as np
from etils import epath

from dgae_jax.cache import format
from dgae_jax.errors import ConfigError

MODES = ("sample", "mean")


class LatentSource:
    """Random access to one split of a cache: `src[i]` is its i-th record (of id i unless images
    before it could not be read; the id is in "id"), as float32
    arrays (h, w, c) "mean", "logvar" [, "flip_mean", "flip_logvar"] plus "label" and "id".

    Opening checks the manifest (and its config hash when `expected_config` is given), that
    every shard exists and, with `verify`, the shards' checksums. `mean` and `std` are the
    per-channel statistics of the sampled training latents from the manifest.
    """

    def __init__(self, directory, split: str = "train", *, expected_config=None,
                 verify: bool = True):
        self.directory, self.split = epath.Path(directory), split
        self.manifest = format.load_manifest(directory, expected_config)
        self.paths = format.check_shards(directory, self.manifest, split, verify)
        self.records = grain.sources.ArrayRecordDataSource(self.paths)
        n = self.manifest["splits"][split]["num_examples"]
        if len(self.records) != n:
            raise ConfigError(f"latent cache {self.directory}: the {split} shards hold "
                              f"{len(self.records)} records, {format.MANIFEST} says {n}")
        stats = self.manifest["stats"]
        self.mean = None if stats is None else np.asarray(stats["mean"], np.float32)
        self.std = None if stats is None else np.asarray(stats["std"], np.float32)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = format.decode_record(self.records[i])
        return {k: v.astype(np.float32) if k in format.FIELDS else v for k, v in record.items()}

    def __repr__(self) -> str:
        return f"LatentSource({os.fspath(self.directory)!r}, {self.split!r}, {len(self)} examples)"


@dataclasses.dataclass(frozen=True)
class SampleLatent:
    """grain `random_map` op: a stored posterior -> {"latent", "label", "id", "flipped"}.

    The latent is z = mean + exp(logvar / 2) * n (mode 'sample', n drawn from the per-example
    Generator grain passes) or the posterior mean (mode 'mean'), normalised per channel as
    (z - mean_c) / std_c; with `flip` and a cache that stores flipped images, the flipped
    image's posterior is used with probability 1/2. No global RNG: the output is a function of
    (grain seed, index) only.
    """

    mean: np.ndarray
    std: np.ndarray
    mode: str = "sample"
    flip: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"latent mode {self.mode!r} is not one of {', '.join(MODES)}")

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        flipped = bool(self.flip and "flip_mean" in example and rng.uniform() < 0.5)
        prefix = "flip_" if flipped else ""
        z = example[prefix + "mean"]
        if self.mode == "sample":
            noise = rng.standard_normal(z.shape, dtype=np.float32)
            z = z + np.exp(0.5 * example[prefix + "logvar"]) * noise
        latent = ((z - self.mean) / self.std).astype(np.float32)
        return {"latent": latent, "label": example["label"], "id": example["id"],
                "flipped": np.bool_(flipped)}


def latent_dataset(directory, split: str = "train", *, mode: str = "sample", flip: bool = True,
                   seed: int = 0, expected_config=None, verify: bool = True) -> grain.MapDataset:
    """A grain MapDataset of normalised latents of one split (shuffle, repeat and batch it)."""
    source = LatentSource(directory, split, expected_config=expected_config, verify=verify)
    if source.mean is None:
        raise ConfigError(f"latent cache {directory} has no training statistics to normalise "
                          "with (it was made without the train split)")
    op = SampleLatent(source.mean, source.std, mode, flip)
    return grain.MapDataset.source(source).random_map(op, seed=seed)
