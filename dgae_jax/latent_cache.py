"""`--mode=cache_latents`: encode a dataset once with a trained DGAE; sharded, resumable, checked.

The latent DiT trains on latents, so each image of the chosen splits (`cache.splits`) is encoded
once, in its deterministic eval view, with the EMA encoder of a checkpoint, and its posterior
(mean and log-variance, also of the flipped image) stored in `cache.dir`; data/latents.py has the
file layout, the record format and the reader.

* Plan: each split's ids [0, n) are cut into shards of `cache.examples_per_shard` contiguous ids;
  the shards of all splits, in order, go round-robin to the processes.
* Encode: one grain stream of this process's pending examples (threads decode ahead of the
  device), a jitted encoder on this process's own devices (batch split over them, no
  collectives: processes run independent numbers of calls), and a writer thread that fetches
  each batch, drops the padding, checks the ids, accumulates float64 statistics and writes the
  records, so the device loop never waits on the host.
* A shard is written to `<name>.array_record.tmp`, closed, hashed, its sidecar written (tmp +
  rename), then renamed to `<name>.array_record`.
* Resume: a shard whose file and sidecar exist, whose sidecar matches this run (config and data
  hashes, checkpoint step, dtype, flip, id range) and whose bytes hash to the sidecar's sha256
  is kept; any other is rewritten (leftover .tmp files are overwritten). A sidecar of another
  run is an error, never mixed in.
* After a barrier, process 0 checks that the shards tile every split and writes manifest.json.
* Statistics of the sampled latent z = mu + sigma * eps, per channel over the train split's
  examples and positions (unflipped), from the float32 encoder output in float64:
  mean_c = E[mu_c], var_c = Var(mu_c) + E[exp(logvar_c)].
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import os
import queue
import tempfile
import threading
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from etils import epath
from jax.experimental import multihost_utils

from dgae_jax import checkpoint, parallel
from dgae_jax.config_lib import ConfigError
from dgae_jax.data import latents, pipeline, sources
from dgae_jax.steps import compile_run

ROLES = ("train", "eval")


def validate(config: ml_collections.ConfigDict) -> None:
    c = config.cache
    if not c.dir and not c.benchmark:
        raise ConfigError("cache.dir is required for --mode=cache_latents")
    if c.dtype not in latents.DTYPES:
        raise ConfigError(f"cache.dtype={c.dtype!r} is not one of {', '.join(latents.DTYPES)}")
    splits = tuple(c.splits)
    if not splits or len(set(splits)) != len(splits) or not set(splits) <= set(ROLES):
        raise ConfigError(f"cache.splits={splits!r} must be distinct names from {ROLES}")
    for field in ("batch_size", "examples_per_shard", "log_every"):
        if c[field] <= 0:
            raise ConfigError(f"cache.{field}={c[field]} must be positive")
    if c.read_threads < 0 or c.benchmark < 0:
        raise ConfigError("cache.read_threads and cache.benchmark must not be negative")
    if c.batch_size % jax.device_count():
        raise ConfigError(f"cache.batch_size={c.batch_size} (global) is not divisible by the "
                          f"{jax.device_count()} devices")


# --------------------------------------------------------------------------- plan

@dataclasses.dataclass(frozen=True)
class Shard:
    split: str  # role: 'train' | 'eval'
    index: int
    num: int
    start: int  # ids [start, end) of the split
    end: int

    @property
    def name(self) -> str:
        return latents.shard_name(self.split, self.index, self.num)

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


def data_identity(config: ml_collections.ConfigDict) -> dict:
    """What fixes the images behind the ids (the eval view's size is in the config hash)."""
    d = config.data
    out = {"data": {k: d.get(k) for k in ("name", "train_split", "eval_split", "dir",
                                          "eval_subset")},
           "crops_per_image": int(config.cache.get("crops_per_image", 1))}
    if out["crops_per_image"] > 1:
        out["seed"] = int(config.seed)  # places the crops
    return out


def identity(config: ml_collections.ConfigDict, step: int, latent_shape) -> dict:
    """What a sidecar and the manifest must agree on for shards to be combined."""
    data = latents.canonical_json(data_identity(config)).encode()
    return {"format": latents.FORMAT, "config_sha256": latents.config_hash(config),
            "data_sha256": hashlib.sha256(data).hexdigest(), "step": int(step),
            "dtype": config.cache.dtype, "flip": bool(config.cache.flip),
            "latent_shape": [int(d) for d in latent_shape]}


def _data_path(directory: epath.Path, shard: Shard) -> epath.Path:
    return directory / f"{shard.name}.array_record"


def _sidecar_path(directory: epath.Path, shard: Shard) -> epath.Path:
    return directory / f"{shard.name}.json"


def finished(directory: epath.Path, shard: Shard, ident: dict) -> dict | None:
    """The sidecar of a shard that is complete and intact, else None (rewrite it)."""
    data, side = _data_path(directory, shard), _sidecar_path(directory, shard)
    if not (data.exists() and side.exists()):
        return None
    meta = json.loads(side.read_text())
    for key, want in dict(ident, start=shard.start, end=shard.end).items():
        if meta.get(key) != want:
            hint = " (pass --config.cache.step to match)" if key == "step" else ""
            raise ConfigError(f"{side} belongs to another caching run ({key}={meta.get(key)!r}, "
                              f"this run {want!r}){hint}; use another cache.dir")
    if latents.file_sha256(data) != meta["sha256"]:
        logging.warning("%s does not match the sha256 of its sidecar: rewriting it", data)
        return None
    return meta


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


# --------------------------------------------------------------------------- files

def _is_local(directory: epath.Path) -> bool:
    return "://" not in os.fspath(directory)


def write_json(path: epath.Path, obj) -> None:
    """Written to `<path>.tmp`, then renamed: a reader sees the whole file or none."""
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


class _ShardWriter:
    """Writes one shard's records in id order to a temporary file; `finish` hashes it, writes
    the sidecar and renames it into place. Bucket directories stage the file locally (the
    ArrayRecord writer needs a local path) and copy it up."""

    def __init__(self, directory: epath.Path, shard: Shard, ident: dict, dtype: np.dtype):
        self.directory, self.shard, self.ident, self.dtype = directory, shard, ident, dtype
        final = _data_path(directory, shard)
        if _is_local(directory):
            self.local_tmp = os.fspath(final) + ".tmp"
        else:
            self.local_tmp = os.path.join(tempfile.mkdtemp(prefix="dgae_cache_"), final.name)
        self.writer = ArrayRecordWriter(self.local_tmp, latents.WRITER_OPTIONS)
        self.next_id, self.sums = shard.start, None

    @property
    def full(self) -> bool:
        return self.next_id == self.shard.end

    def add(self, ids: np.ndarray, labels: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        want = np.arange(self.next_id, self.next_id + len(ids))
        if not np.array_equal(ids, want) or want[-1] >= self.shard.end:
            raise RuntimeError(f"shard {self.shard.name}: got ids {ids.tolist()}, expected "
                               f"{want.tolist()} within [{self.shard.start}, {self.shard.end})")
        self.sums = add_sums(self.sums, partial_sums(arrays["mean"], arrays["logvar"]))
        stored = [arrays[k].astype(self.dtype) for k in latents.FIELDS if k in arrays]
        for j, (i, label) in enumerate(zip(ids.tolist(), labels.tolist())):
            self.writer.write(latents.encode_record(i, label, [a[j] for a in stored]))
        self.next_id += len(ids)

    def finish(self) -> dict:
        """Checks the ids of the records actually in the file, then publishes the shard."""
        self.writer.close()
        s = self.shard
        reader = ArrayRecordReader(self.local_tmp)
        ids = [latents.HEADER.unpack_from(r)[1] for r in reader.read_all()]
        reader.close()
        if ids != list(range(s.start, s.end)):
            raise RuntimeError(f"shard {s.name}: the file holds {len(ids)} records whose ids are "
                               f"not exactly [{s.start}, {s.end}) in order")
        meta = dict(self.ident, split=s.split, file=_data_path(self.directory, s).name,
                    start=s.start, end=s.end, count=len(ids),
                    sha256=latents.file_sha256(self.local_tmp),
                    bytes=os.path.getsize(self.local_tmp),
                    sums={k: np.asarray(v).tolist() for k, v in self.sums.items()})
        write_json(_sidecar_path(self.directory, s), meta)
        final = _data_path(self.directory, s)
        if _is_local(self.directory):
            os.replace(self.local_tmp, final)
        else:
            tmp = final.parent / (final.name + ".tmp")
            epath.Path(self.local_tmp).copy(tmp, overwrite=True)
            tmp.replace(final)
            os.remove(self.local_tmp)
            os.rmdir(os.path.dirname(self.local_tmp))
        return meta


class _Writer:
    """The host side of the job, in a thread: fetches encoded batches, writes them into this
    process's pending shards in order, finishes shards and logs progress. The device loop only
    enqueues (a bounded queue: at most `depth` batches in flight)."""

    def __init__(self, directory, pending: list[Shard], ident: dict, config, depth: int = 3):
        self.directory, self.ident, self.config = directory, ident, config
        self.dtype = latents.DTYPES[config.cache.dtype]
        self.shards = iter(pending)
        self.total = sum(s.count for s in pending)
        self.current: _ShardWriter | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._loop, name="latent-writer", daemon=True)
        self.error: BaseException | None = None
        self.batches = self.images = 0
        self.first = None  # (time, images) after the first batch: compile time excluded
        self.last_time = None

    def __enter__(self):
        self.thread.start()
        return self

    def put(self, outputs: dict, meta: dict) -> None:
        if self.error is not None:
            raise RuntimeError("the latent writer thread failed") from self.error
        self.queue.put((outputs, meta))

    def __exit__(self, exc_type, exc, tb):
        self.queue.put(None)
        self.thread.join()
        if exc_type is None and self.error is not None:
            raise RuntimeError("the latent writer thread failed") from self.error
        if exc_type is None and (self.current is not None or next(self.shards, None)):
            raise RuntimeError("the example stream ended before every planned shard was written")

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:  # after a failure, keep draining so put() never blocks
                try:
                    self._write(*item)
                except BaseException as e:  # re-raised in the main thread
                    self.error = e

    def _write(self, outputs: dict, meta: dict) -> None:
        host = jax.device_get(outputs)
        keep = np.flatnonzero(meta["mask"])
        ids, labels, roles = meta["id"][keep], meta["label"][keep], meta["split"][keep]
        arrays = {k: np.asarray(v)[keep] for k, v in host.items()}
        pos = 0
        while pos < len(keep):
            if self.current is None:
                shard = next(self.shards, None)
                if shard is None:
                    raise RuntimeError(f"example stream has more rows than planned (id {ids[pos]})")
                self.current = _ShardWriter(self.directory, shard, self.ident, self.dtype)
            shard = self.current.shard
            part = slice(pos, pos + min(shard.end - self.current.next_id, len(keep) - pos))
            if np.any(roles[part] != ROLES.index(shard.split)):
                raise RuntimeError(f"rows of another split reached shard {shard.name}")
            self.current.add(ids[part], labels[part], {k: v[part] for k, v in arrays.items()})
            pos = part.stop
            if self.current.full:
                self.current.finish()
                logging.info("cache_latents: wrote %s (%d examples)", shard.name, shard.count)
                self.current = None
        self.batches += 1
        self.images += len(keep)
        self.last_time = time.time()
        if self.first is None:
            self.first = (self.last_time, self.images)
        if self.batches % self.config.cache.log_every == 0 or self.images == self.total:
            rate = self.rate()
            eta = (self.total - self.images) / rate if rate else float("nan")
            logging.info("cache_latents: %d / %d images (%.1f%%), %.1f images/s, ETA %s",
                         self.images, self.total, 100 * self.images / max(1, self.total), rate,
                         datetime.timedelta(seconds=round(eta)) if np.isfinite(eta) else "?")

    def rate(self) -> float:
        """Images/s after the first batch (which includes compilation)."""
        if self.first is None or self.last_time <= self.first[0]:
            return 0.0
        return (self.images - self.first[1]) / (self.last_time - self.first[0])


# --------------------------------------------------------------------------- encoding

def _load(i: int, *, pending: list[Shard], starts: np.ndarray, split_sources: dict,
          size: int) -> dict:
    """Flat position i of this process's pending examples -> its eval view, or padding."""
    if i >= starts[-1]:
        example = pipeline.eval_example(0, source=None, count=0, size=size)
        return dict(example, split=np.int32(-1))
    k = int(np.searchsorted(starts, i, side="right")) - 1
    shard = pending[k]
    source = split_sources[shard.split]
    example = pipeline.eval_example(shard.start + i - int(starts[k]), source=source,
                                    count=len(source), size=size)
    return dict(example, split=np.int32(ROLES.index(shard.split)))


def example_stream(config, pending: list[Shard], split_sources: dict,
                   local_batch: int) -> grain.IterDataset:
    """Batches of the pending shards' examples in order, the last padded (mask False), with
    `cache.read_threads` threads decoding ahead of the consumer."""
    starts = np.cumsum([0] + [s.count for s in pending])
    padded = -(-int(starts[-1]) // local_batch) * local_batch
    ds = grain.MapDataset.range(padded).map(functools.partial(
        _load, pending=pending, starts=starts, split_sources=split_sources,
        size=config.image_size))
    threads = int(config.cache.read_threads)
    buffer = max(2 * local_batch, threads) if threads else 0
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
    return ds.batch(local_batch)


def make_encoder(model, mesh, flip: bool) -> callable:
    """jitted (encoder params, uint8 images) -> float32 posteriors of the images [and of their
    horizontal flips], batch-sharded over `mesh`; one per (model config, mesh, flip)."""
    return _encoder(dataclasses.replace(model, lpips_weights=None), mesh, bool(flip))


@functools.lru_cache(maxsize=8)
def _encoder(model, mesh, flip: bool) -> callable:
    def encode(params, images):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        q = model.encode({"encoder": params}, x)
        out = {"mean": q.mean, "logvar": q.logvar}
        if flip:
            qf = model.encode({"encoder": params}, x[:, :, ::-1])
            out.update(flip_mean=qf.mean, flip_logvar=qf.logvar)
        return out

    return jax.jit(encode, out_shardings=parallel.batch_sharding(mesh))


def local_mesh(devices=None) -> jax.sharding.Mesh:
    """All of this process's devices on the data axis: encoding needs no collectives."""
    return parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)),
                              devices if devices is not None else jax.local_devices())


def checkpoint_step(config: ml_collections.ConfigDict, workdir: str) -> int:
    """`cache.step`, or the latest step, after checking that the checkpoint exists."""
    directory = checkpoint.run_directory(workdir) / "checkpoints"
    if not directory.exists():  # checked first: Checkpoints() would create it
        raise ConfigError(f"no checkpoint in {directory}: --workdir must be a trained "
                          "autoencoder run")
    ckpt = checkpoint.Checkpoints(workdir, config)
    try:
        steps = sorted(ckpt.manager.all_steps())
    finally:
        ckpt.close()
    if not steps:
        raise ConfigError(f"no checkpoint in {directory}: --workdir must be a trained "
                          "autoencoder run")
    step = steps[-1] if config.cache.step is None else config.cache.step
    if step not in steps:
        raise ConfigError(f"cache.step={step}: {directory} has no checkpoint of that step "
                          f"(it has {steps})")
    return step


def restore_encoder(config: ml_collections.ConfigDict, workdir: str, task, step: int) -> dict:
    """The EMA encoder parameters of checkpoint `step` as host numpy arrays. The whole train
    state is restored (into the config's mesh) and all but the encoder dropped: Orbax cannot
    restore part of an item saved as one StandardSave."""
    fns = compile_run(config, task, parallel.make_mesh(config.mesh))
    ckpt = checkpoint.Checkpoints(workdir, config)
    try:
        _, state = ckpt.restore(fns.abstract_state, step=step)
    finally:
        ckpt.close()
    encoder = state["ema"]["encoder"]
    if jax.process_count() == 1:
        return jax.device_get(encoder)
    return multihost_utils.process_allgather(encoder, tiled=True)


# --------------------------------------------------------------------------- manifest

def write_manifest(directory: epath.Path, config, ident: dict, workdir: str,
                   counts: dict[str, int], shards: list[Shard]) -> dict:
    """Checks every planned shard (sidecar, file, id range) and writes manifest.json."""
    splits, train_sums = {}, None
    for split, n in counts.items():
        entries, end, sums = [], 0, None
        for shard in (s for s in shards if s.split == split):
            side = _sidecar_path(directory, shard)
            if not (side.exists() and _data_path(directory, shard).exists()):
                raise RuntimeError(f"shard {_data_path(directory, shard)} is not finished; "
                                   "rerun the job to complete the cache")
            meta = json.loads(side.read_text())
            if any(meta[k] != v for k, v in ident.items()) or meta["start"] != end:
                raise RuntimeError(f"{side} does not continue the {split} split at id {end}")
            if meta["count"] != meta["end"] - meta["start"]:
                raise RuntimeError(f"{side}: count {meta['count']} != its id range")
            end = meta["end"]
            sums = add_sums(sums, meta["sums"])
            entries.append({k: meta[k] for k in ("file", "start", "end", "count", "sha256",
                                                 "bytes")})
        if end != n or sum(e["count"] for e in entries) != n:
            raise RuntimeError(f"the {split} shards cover ids [0, {end}), not [0, {n})")
        data_split = config.data.train_split if split == "train" else config.data.eval_split
        splits[split] = {"dataset": config.data.name, "dataset_split": data_split,
                         "num_examples": n, "stats": latent_stats(sums), "shards": entries}
        if split == "train":
            train_sums = sums
    manifest = dict(
        ident,
        encoder_config=latents.encoder_identity(config),
        data_config=data_identity(config),
        config=json.loads(config.to_json_best_effort()),
        checkpoint={"workdir": os.fspath(checkpoint.run_directory(workdir)),
                    "step": ident["step"]},
        examples_per_shard=int(config.cache.examples_per_shard),
        record=(f"ArrayRecord ({latents.WRITER_OPTIONS}); record = header struct "
                f"'{latents.HEADER.format}' (magic, id, label, dtype code "
                f"{latents.DTYPE_CODES}, array count, h, w, c) + the arrays "
                f"{', '.join(latents.FIELDS)} (flip_* only when flip)"),
        splits=splits,
        stats=None if train_sums is None else dict(split="train", **latent_stats(train_sums)))
    write_json(directory / latents.MANIFEST, manifest)
    return manifest


def _complete(directory: epath.Path, ident: dict, counts: dict, config) -> dict | None:
    """The manifest if this exact cache is already complete; an error if it is another one."""
    path = directory / latents.MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    have = {k: manifest.get(k) for k in ident} | {
        "splits": {s: e["num_examples"] for s, e in manifest["splits"].items()},
        "examples_per_shard": manifest.get("examples_per_shard")}
    want = dict(ident, splits=counts, examples_per_shard=config.cache.examples_per_shard)
    if have != want:
        diff = [k for k in want if have.get(k) != want[k]]
        raise ConfigError(f"{path} describes another cache (differs in {', '.join(diff)}); "
                          "use another cache.dir")
    return manifest


# --------------------------------------------------------------------------- the job

def run_job(config, workdir: str, model, step: int, load_params, directory: epath.Path,
            split_sources: dict, devices=None) -> dict:
    """Encodes and writes this process's unfinished shards, then (process 0) the manifest.
    `load_params()` gives the encoder parameters; it is called (by every process: restoring is
    collective) only when some shard is left to write."""
    counts = {s: len(split_sources[s]) for s in config.cache.splits}
    for split, n in counts.items():
        if n == 0:
            raise ConfigError(f"cache.splits: the {split} split has no examples")
    latent_shape = model.latent_shape
    ident = identity(config, step, latent_shape)
    summary = {"cache_dir": os.fspath(directory), "step": step, "examples": counts,
               "latent_shape": list(latent_shape), "dtype": config.cache.dtype}
    directory.mkdir(parents=True, exist_ok=True)
    if (manifest := _complete(directory, ident, counts, config)) is not None:
        logging.info("cache_latents: %s is already complete", directory)
        return dict(summary, shards=sum(len(e["shards"]) for e in manifest["splits"].values()),
                    written=0, images_per_sec=0.0)
    shards = plan_shards(counts, config.cache.examples_per_shard)
    mine = shards[jax.process_index()::jax.process_count()]
    pending = [s for s in mine if finished(directory, s, ident) is None]
    logging.info("cache_latents: %d shards in all, %d for this process, %d of them to write",
                 len(shards), len(mine), len(pending))
    rate = 0.0
    left = (len(pending) if jax.process_count() == 1 else
            int(np.sum(multihost_utils.process_allgather(np.int32(len(pending))))))
    params = load_params() if left else None
    if pending:
        mesh = local_mesh(devices)
        local_batch = config.cache.batch_size // jax.process_count()
        encode = make_encoder(model, mesh, config.cache.flip)
        params = jax.device_put(params, parallel.replicated(mesh))
        with _Writer(directory, pending, ident, config) as writer:
            for local in example_stream(config, pending, split_sources, local_batch):
                images = parallel.global_batch({"image": local["image"]}, mesh)["image"]
                writer.put(encode(params, images), local)
        rate = writer.rate()
    multihost_utils.sync_global_devices("cache_latents: every shard written")
    if jax.process_index() == 0:
        write_manifest(directory, config, ident, workdir, counts, shards)
        logging.info("cache_latents: wrote %s", directory / latents.MANIFEST)
    multihost_utils.sync_global_devices("cache_latents: manifest written")
    return dict(summary, shards=len(shards), written=len(pending), images_per_sec=rate)


def cache_latents(config: ml_collections.ConfigDict, workdir: str, task, devices=None) -> dict:
    """`--mode=cache_latents`: the cache in `cache.dir` (or, with `cache.benchmark`, timings)."""
    validate(config)
    if config.cache.benchmark:
        return benchmark(config, workdir, task, devices)
    step = checkpoint_step(config, workdir)
    split_sources = {s: sources.cache_source(config, s) for s in config.cache.splits}

    def load_params():
        logging.info("cache_latents: restoring the EMA encoder of step %d from %s", step, workdir)
        return restore_encoder(config, workdir, task, step)

    return run_job(config, workdir, task.model, step, load_params,
                   checkpoint.run_directory(config.cache.dir), split_sources, devices)


# --------------------------------------------------------------------------- benchmark

class Cycled:
    """The first n examples of `source` repeated: a dataset of any size for timing."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.source[i % len(self.source)]


def benchmark(config, workdir: str, task, devices=None) -> dict:
    """Caching throughput (the real job on `cache.benchmark` train images, cycled, written to a
    temporary directory) next to the jitted encoder alone on one device-resident batch, both at
    `cache.batch_size` and without the first (compiling) batch. The encoder alone is timed
    before and after the job and averaged, so a drifting load on a shared host biases neither."""
    step = checkpoint_step(config, workdir)
    params = restore_encoder(config, workdir, task, step)
    n, batch = config.cache.benchmark, config.cache.batch_size
    source = Cycled(sources.cache_source(config, "train"), n)
    mesh = local_mesh(devices)
    encode = make_encoder(task.model, mesh, config.cache.flip)
    device_params = jax.device_put(params, parallel.replicated(mesh))
    images = np.stack([pipeline.eval_example(i, source=source, count=n,
                                             size=config.image_size)["image"]
                       for i in range(batch // jax.process_count())])
    images = parallel.global_batch({"image": images}, mesh)["image"]
    jax.block_until_ready(encode(device_params, images))  # compiles
    calls = max(3, n // batch - 1)

    def encoder_alone() -> float:
        start = time.time()
        for _ in range(calls):
            out = encode(device_params, images)
        jax.block_until_ready(out)
        return calls * batch / (time.time() - start)

    before = encoder_alone()
    bench = config.copy_and_resolve_references()
    bench.cache.splits = ("train",)
    with tempfile.TemporaryDirectory(prefix="dgae_cache_bench_") as tmp:
        start = time.time()
        job = run_job(bench, workdir, task.model, step, lambda: params, epath.Path(tmp),
                      {"train": source}, devices)
        total_s = time.time() - start
        size = sum(os.path.getsize(p) for p in epath.Path(tmp).glob("*.array_record"))
    encode_rate = (before + encoder_alone()) / 2
    return {"config": config.name, "image_size": config.image_size,
            "latent_shape": job["latent_shape"], "dtype": config.cache.dtype,
            "flip": bool(config.cache.flip), "batch_size": batch, "devices": mesh.size,
            "device_kind": jax.devices()[0].device_kind, "images": n,
            "cache_images_per_sec": job["images_per_sec"],
            "encode_images_per_sec": encode_rate,
            "cache_vs_encode": job["images_per_sec"] / encode_rate,
            "total_s_with_compile": total_s, "bytes_per_1000_images": 1000 * size / n}
