"""Latent caches: the record format, the manifest, and a grain source that reads a cache back.

A cache (written by `dgae_jax.latent_cache`, `--mode=cache_latents`) is one directory:

    <split>-<k>-of-<n>.array_record  ArrayRecord shard (group_size 1, zstd): the contiguous ids
                                     [k * E, min((k + 1) * E, count)) of split <split>, in order
    <split>-<k>-of-<n>.json          its sidecar: the run's identity, id range, sha256, partial
                                     sums for the latent statistics
    manifest.json                    written last, by process 0: its presence means complete

`<split>` is the role, 'train' or 'eval' (config.data.train_split / eval_split name the dataset
splits), and a split's shards tile its ids, so record r of the concatenated shards is id r.

Record (little-endian): a 24-byte header `HEADER` = magic b"DGL1", id int64, label int32,
dtype code uint8 (DTYPE_CODES), array count uint8 (2, or 4 with the flipped image), latent
h, w, c uint16; then the arrays, each h*w*c elements in C order: posterior mean, log-variance
[, mean and log-variance of the horizontally flipped image]. Raw bytes, so every dtype,
bfloat16 included, round-trips bit for bit.

Like sources.py this imports no jax: it runs in grain workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct

import grain
import ml_dtypes
import numpy as np
from etils import epath

from dgae_jax.config_lib import ConfigError

FORMAT = "dgae-latent-cache/1"
MANIFEST = "manifest.json"
MAGIC = b"DGL1"
HEADER = struct.Struct("<4sqiBB3H")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}
FIELDS = ("mean", "logvar", "flip_mean", "flip_logvar")
# group_size 1: one record per chunk, so a random read decodes one record (what grain wants).
WRITER_OPTIONS = "group_size:1,zstd:3"
MODES = ("sample", "mean")


# --------------------------------------------------------------------------- records

def encode_record(example_id: int, label: int, arrays) -> bytes:
    """One record: header + the raw bytes of 2 or 4 equal-shape (h, w, c) arrays of one dtype."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    dtype = arrays[0].dtype
    name = next((n for n, d in DTYPES.items() if d == dtype), None)
    if name is None or len(arrays) not in (2, 4):
        raise ValueError(f"a record holds 2 or 4 arrays of {', '.join(DTYPES)}, got "
                         f"{len(arrays)} of {dtype}")
    if any(a.dtype != dtype or a.shape != arrays[0].shape or a.ndim != 3 for a in arrays):
        raise ValueError(f"record arrays differ in shape or dtype: {[a.shape for a in arrays]}")
    header = HEADER.pack(MAGIC, int(example_id), int(label), DTYPE_CODES[name], len(arrays),
                         *arrays[0].shape)
    return b"".join([header] + [a.astype(dtype.newbyteorder("<"), copy=False).tobytes()
                                for a in arrays])


def decode_record(record: bytes) -> dict:
    """bytes -> {"id", "label", "mean", "logvar"[, "flip_mean", "flip_logvar"]} (stored dtype)."""
    magic, example_id, label, code, count, h, w, c = HEADER.unpack_from(record)
    if magic != MAGIC:
        raise ValueError(f"not a latent record (magic {magic!r}, expected {MAGIC!r})")
    dtype = DTYPES[[n for n, k in DTYPE_CODES.items() if k == code][0]].newbyteorder("<")
    size = h * w * c
    if len(record) != HEADER.size + count * size * dtype.itemsize:
        raise ValueError(f"latent record of id {example_id} has {len(record)} bytes, expected "
                         f"{HEADER.size + count * size * dtype.itemsize}")
    flat = np.frombuffer(record, dtype, count * size, HEADER.size).reshape(count, h, w, c)
    out = {"id": np.int64(example_id), "label": np.int32(label)}
    out.update(zip(FIELDS, flat))
    return out


# --------------------------------------------------------------------------- identity

def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def encoder_identity(config) -> dict:
    """What fixes the latents of an image: the `model` sub-config and image_size (the eval view
    is a shorter-side resize and centre crop at image_size). Training, data and cache fields are
    left out, so retraining settings do not change the hash but any model change does."""
    return {"image_size": int(config.image_size), "model": json.loads(config.model.to_json())}


def config_hash(config) -> str:
    """sha256 of the canonical JSON of `encoder_identity(config)`."""
    return hashlib.sha256(canonical_json(encoder_identity(config)).encode()).hexdigest()


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def shard_name(split: str, index: int, num: int) -> str:
    return f"{split}-{index:05d}-of-{num:05d}"


# --------------------------------------------------------------------------- manifest

def load_manifest(directory, expected_config=None) -> dict:
    """The manifest of a complete cache; with `expected_config`, also checks its hash."""
    directory = epath.Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise ConfigError(f"latent cache {directory} is incomplete: no {MANIFEST} (the caching "
                          "job has not finished; rerun it to complete the cache)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    if expected_config is not None and manifest["config_sha256"] != config_hash(expected_config):
        raise ConfigError(f"latent cache {directory} was made by another autoencoder config "
                          f"({path} has config_sha256 {manifest['config_sha256'][:16]}..., this "
                          f"config {config_hash(expected_config)[:16]}...): re-cache with it")
    return manifest


def check_shards(directory, manifest: dict, split: str, verify: bool = True) -> list[str]:
    """Paths of `split`'s shards in id order, after checking they exist, tile [0, n) and (with
    `verify`) hash to the manifest's sha256: one read pass over the split's files."""
    directory = epath.Path(directory)
    if split not in manifest["splits"]:
        raise ConfigError(f"latent cache {directory} has no split {split!r} (it has "
                          f"{', '.join(manifest['splits'])})")
    entry = manifest["splits"][split]
    paths, end = [], 0
    for shard in entry["shards"]:
        path = directory / shard["file"]
        if shard["start"] != end:
            raise ConfigError(f"{directory / MANIFEST}: shard {path} starts at id "
                              f"{shard['start']}, expected {end}")
        end = shard["end"]
        if not path.exists():
            raise ConfigError(f"latent cache shard {path} is missing")
        if verify and file_sha256(path) != shard["sha256"]:
            raise ConfigError(f"latent cache shard {path} is corrupted: its sha256 differs from "
                              f"the one in {MANIFEST}")
        paths.append(os.fspath(path))
    if end != entry["num_examples"]:
        raise ConfigError(f"{directory / MANIFEST}: the {split} shards end at id {end}, "
                          f"expected {entry['num_examples']}")
    return paths


# --------------------------------------------------------------------------- reading

class LatentSource:
    """Random access to one split of a cache: `src[i]` is the decoded record of id i, as float32
    arrays (h, w, c) "mean", "logvar" [, "flip_mean", "flip_logvar"] plus "label" and "id".

    Opening checks the manifest (and its config hash when `expected_config` is given), that
    every shard exists and, with `verify`, the shards' checksums. `mean` and `std` are the
    per-channel statistics of the sampled training latents from the manifest.
    """

    def __init__(self, directory, split: str = "train", *, expected_config=None,
                 verify: bool = True):
        self.directory, self.split = epath.Path(directory), split
        self.manifest = load_manifest(directory, expected_config)
        self.paths = check_shards(directory, self.manifest, split, verify)
        self.records = grain.sources.ArrayRecordDataSource(self.paths)
        n = self.manifest["splits"][split]["num_examples"]
        if len(self.records) != n:
            raise ConfigError(f"latent cache {self.directory}: the {split} shards hold "
                              f"{len(self.records)} records, {MANIFEST} says {n}")
        stats = self.manifest["stats"]
        self.mean = None if stats is None else np.asarray(stats["mean"], np.float32)
        self.std = None if stats is None else np.asarray(stats["std"], np.float32)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = decode_record(self.records[i])
        return {k: v.astype(np.float32) if k in FIELDS else v for k, v in record.items()}

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
