"""The latent cache's file format, described here and nowhere else, and the code that makes and
checks its bytes. Like data/sources.py this imports no jax: it runs in grain workers.

A cache (written by `--mode=cache_latents`, cache/job.py) is one directory:

    <split>-<k>-of-<n>.array_record  ArrayRecord shard (WRITER_OPTIONS): the contiguous ids
                                     [k * E, min((k + 1) * E, count)) of split <split>, in order,
                                     less the images that could not be read
                                     (E = cache.examples_per_shard; k, n with five digits)
    <split>-<k>-of-<n>.json          its sidecar, written before the shard is renamed into place
    manifest.json                    written last, by process 0: its presence means complete
    *.tmp                            files of an interrupted run, overwritten when it resumes

`<split>` is the role, 'train' or 'eval' (ROLES; config.data.train_split / eval_split name the
dataset splits), and a split's shards tile its ids: record r of the concatenated shards is id r
when every image could be read. An unreadable image (data/bad_images.py) gets no record (never
another image's latents) and its id is listed as "missing"; records carry their ids.

Identity (`identity`): "format" (FORMAT), "config_sha256" (`config_hash`: what fixes the latents
of an image), "data_sha256" (of `data_identity`: what fixes the images behind the ids), the
checkpoint "step", "dtype", "flip" and "latent_shape". Shards are combined only when all agree.

Sidecar (JSON): the identity, "split", "file", the id range "start", "end", "count" (records),
"missing" (the unreadable ids), the file's "sha256" and "bytes", and "sums": the shard's partial
sums of the statistics.

Manifest (JSON): the identity; "encoder_config" and "data_config" (what the two hashes are of);
"config" (the whole autoencoder config); "checkpoint" {"workdir", "step"};
"examples_per_shard"; "record" (the record layout in one line); "splits": per role {"dataset",
"dataset_split", "num_ids", "num_examples" (records), "missing", "stats", "shards": [{"file",
"start", "end", "count", "missing", "sha256", "bytes"}]}; "stats": the train split's statistics
plus "split": "train" (null without it).

Record (little-endian): a 24-byte header `HEADER` = magic b"DGL1", id int64, label int32,
dtype code uint8 (DTYPE_CODES), array count uint8 (2, or 4 with the flipped image), latent
h, w, c uint16; then the arrays, each h*w*c elements in C order: posterior mean, log-variance
[, mean and log-variance of the horizontally flipped image] (FIELDS). Raw bytes, so every dtype,
bfloat16 included, round-trips bit for bit.

Statistics of the sampled latent z = mu + sigma * eps, per channel over the train split's
examples and positions (unflipped), from the float32 encoder output in float64 (before the cast
to the stored dtype): mean_c = E[mu_c], std_c^2 = Var(mu_c) + E[exp(logvar_c)], as
{"positions", "mean", "std"}. The sidecars' sums ("count" positions, "sum" and "sum_sq" of mu,
"sum_var" of exp(logvar)) add up across shards to exactly the manifest's statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct

import ml_dtypes
import numpy as np
from etils import epath

from dgae_jax.errors import ConfigError

FORMAT = "dgae-latent-cache/2"
MANIFEST = "manifest.json"
ROLES = ("train", "eval")
MAGIC = b"DGL1"
HEADER = struct.Struct("<4sqiBB3H")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}
FIELDS = ("mean", "logvar", "flip_mean", "flip_logvar")
# group_size 1: one record per chunk, so a random read decodes one record (what grain wants).
WRITER_OPTIONS = "group_size:1,zstd:3"


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


# --------------------------------------------------------------------------- shards

@dataclasses.dataclass(frozen=True)
class Shard:
    """One planned shard: ids [start, end) of a split, the index-th of num."""

    split: str  # role: 'train' | 'eval'
    index: int
    num: int
    start: int
    end: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.num:05d}"

    @property
    def file(self) -> str:
        return f"{self.name}.array_record"

    @property
    def sidecar(self) -> str:
        return f"{self.name}.json"

    @property
    def count(self) -> int:
        return self.end - self.start


def plan_shards(counts: dict[str, int], per_shard: int) -> list[Shard]:
    """Every split's ids cut into contiguous shards of `per_shard` (the last may be shorter)."""
    shards = []
    for split, n in counts.items():
        num = -(-n // per_shard)
        shards += [Shard(split, k, num, k * per_shard, min(n, (k + 1) * per_shard))
                   for k in range(num)]
    return shards


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


def data_identity(config) -> dict:
    """What fixes the images behind the ids (the eval view's size is in the config hash)."""
    d = config.data
    out = {"data": {k: d.get(k) for k in ("name", "train_split", "eval_split", "dir",
                                          "eval_subset")},
           "crops_per_image": int(config.cache.get("crops_per_image", 1))}
    if out["crops_per_image"] > 1:
        out["seed"] = int(config.seed)  # places the crops
    return out


def identity(config, step: int, latent_shape) -> dict:
    """What a sidecar and the manifest must agree on for shards to be combined."""
    data = canonical_json(data_identity(config)).encode()
    return {"format": FORMAT, "config_sha256": config_hash(config),
            "data_sha256": hashlib.sha256(data).hexdigest(), "step": int(step),
            "dtype": config.cache.dtype, "flip": bool(config.cache.flip),
            "latent_shape": [int(d) for d in latent_shape]}


# --------------------------------------------------------------------------- files

def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: epath.Path, obj) -> None:
    """Written to `<path>.tmp`, then renamed: a reader sees the whole file or none."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


# --------------------------------------------------------------------------- statistics

def partial_sums(mean: np.ndarray, logvar: np.ndarray) -> dict:
    """Per-channel float64 sums over the examples and positions of float32 posteriors."""
    mu = mean.astype(np.float64).reshape(-1, mean.shape[-1])
    var = np.exp(logvar.astype(np.float64)).reshape(mu.shape)
    return {"count": int(mu.shape[0]), "sum": mu.sum(0), "sum_sq": (mu * mu).sum(0),
            "sum_var": var.sum(0)}


def add_sums(a: dict | None, b: dict) -> dict:
    if a is None:
        return dict(b)
    return {k: a[k] + np.asarray(b[k]) for k in b}


def latent_stats(sums: dict) -> dict:
    """mean_c = E[mu_c]; std_c = sqrt(Var(mu_c) + E[exp(logvar_c)]): moments of sampled z."""
    n = sums["count"]
    mean = np.asarray(sums["sum"]) / n
    var = np.asarray(sums["sum_sq"]) / n - mean ** 2 + np.asarray(sums["sum_var"]) / n
    return {"positions": int(n), "mean": mean.tolist(), "std": np.sqrt(var).tolist()}


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
    if end != entry["num_ids"]:
        raise ConfigError(f"{directory / MANIFEST}: the {split} shards end at id {end}, "
                          f"expected {entry['num_ids']}")
    return paths
