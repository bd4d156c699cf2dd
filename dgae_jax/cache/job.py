"""The latent cache job (`--mode=cache_latents`): encode a dataset once with a trained DGAE;
sharded, resumable, checked.

The latent DiT trains on latents, so each image of the chosen splits (`cache.splits`) is encoded
once, in its deterministic eval view, with the EMA encoder of a checkpoint, and its posterior
(mean and log-variance, also of the flipped image) stored in `cache.dir`; format.py has the
files, the records and the statistics.

* Plan: each split's ids [0, n) are cut into shards of `cache.examples_per_shard` contiguous ids;
  the shards of all splits, in order, go round-robin to the processes.
* Encode: one grain stream of this process's pending examples (threads decode ahead of the
  device), a jitted encoder on this process's own devices (batch split over them, no
  collectives: processes run independent numbers of calls), and the writer thread (writer.py)
  that turns each batch into records and finished shards, so the device loop never waits on the
  host.
* Resume: a shard whose file and sidecar exist, whose sidecar matches this run (config and data
  hashes, checkpoint step, dtype, flip, id range) and whose bytes hash to the sidecar's sha256
  is kept; any other is rewritten (leftover .tmp files are overwritten). A sidecar of another
  run is an error, never mixed in.
* After a barrier, process 0 checks that the shards tile every split and writes manifest.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from dgae_jax import checkpoint, parallel, pixels, runs
from dgae_jax.cache import format, writer
from dgae_jax.cache.format import Shard
from dgae_jax.data import pipeline, sources
from dgae_jax.errors import ConfigError
from dgae_jax.tasks.trained import load_autoencoder


def finished(directory: epath.Path, shard: Shard, ident: dict) -> dict | None:
    """The sidecar of a shard that is complete and intact, else None (rewrite it)."""
    data, side = directory / shard.file, directory / shard.sidecar
    if not (data.exists() and side.exists()):
        return None
    meta = json.loads(side.read_text())
    for key, want in dict(ident, start=shard.start, end=shard.end).items():
        if meta.get(key) != want:
            hint = " (pass --config.cache.step to match)" if key == "step" else ""
            raise ConfigError(f"{side} belongs to another caching run ({key}={meta.get(key)!r}, "
                              f"this run {want!r}){hint}; use another cache.dir")
    if format.file_sha256(data) != meta["sha256"]:
        logging.warning("%s does not match the sha256 of its sidecar: rewriting it", data)
        return None
    return meta


# --------------------------------------------------------------------------- encoding

def _load(i: int, *, pending: list[Shard], starts: np.ndarray, split_sources: dict,
          size: int, skip_bad: bool) -> dict:
    """Flat position i of this process's pending examples -> its eval view, `unreadable` (with
    skip_bad: left out of the cache and listed), or padding."""
    if i >= starts[-1]:
        example = pipeline.eval_example(0, source=None, count=0, size=size)
        return dict(example, split=np.int32(-1))
    k = int(np.searchsorted(starts, i, side="right")) - 1
    shard = pending[k]
    source = split_sources[shard.split]
    example = pipeline.eval_example(shard.start + i - int(starts[k]), source=source,
                                    count=len(source), size=size, skip_bad=skip_bad)
    return dict(example, split=np.int32(format.ROLES.index(shard.split)))


def example_stream(config, pending: list[Shard], split_sources: dict,
                   local_batch: int) -> grain.IterDataset:
    """Batches of the pending shards' examples in order, the last padded (mask False), with
    `cache.read_threads` threads decoding ahead of the consumer."""
    starts = np.cumsum([0] + [s.count for s in pending])
    padded = -(-int(starts[-1]) // local_batch) * local_batch
    ds = grain.MapDataset.range(padded).map(functools.partial(
        _load, pending=pending, starts=starts, split_sources=split_sources,
        size=config.image_size, skip_bad=config.data.bad_images == "skip"))
    threads = int(config.cache.read_threads)
    buffer = max(2 * local_batch, threads) if threads else 0
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
    return ds.batch(local_batch)


def make_encoder(model, mesh: jax.sharding.Mesh, flip: bool) -> Callable:
    """jitted (encoder params, uint8 images) -> float32 posteriors of the images [and of their
    horizontal flips], batch-sharded over `mesh`. Built once by the caller and passed down, so
    every batch (and the benchmark's job after its timing) runs the same compiled function."""
    model = dataclasses.replace(model, lpips_weights=None)
    flip = bool(flip)

    def encode(params, images):
        x = pixels.to_signed(images)
        q = model.encode({"encoder": params}, x)
        out = {"mean": q.mean, "logvar": q.logvar}
        if flip:
            qf = model.encode({"encoder": params}, x[:, :, ::-1])
            out.update(flip_mean=qf.mean, flip_logvar=qf.logvar)
        return out

    return jax.jit(encode, out_shardings=parallel.batch_sharding(mesh))


def restore_encoder(config: ml_collections.ConfigDict, workdir: str,
                    step: int | None) -> tuple[int, dict]:
    """(step, the EMA encoder parameters of checkpoint `step` as host numpy arrays): only the
    EMA item is read, verified, onto the config's mesh, then gathered to every process. Without
    a step, the newest intact checkpoint (a corrupt newer one is logged and skipped)."""
    mesh = parallel.make_mesh(config.mesh)
    step, _, ema = load_autoencoder(config, workdir, mesh, step, field="cache.step")
    logging.info("cache_latents: the EMA encoder of step %d from %s", step, workdir)
    return step, runs.to_host(ema["encoder"])


# --------------------------------------------------------------------------- manifest

def write_manifest(directory: epath.Path, config, ident: dict, workdir: str,
                   counts: dict[str, int], shards: list[Shard]) -> dict:
    """Checks every planned shard (sidecar, file, id range) and writes manifest.json."""
    splits, train_sums = {}, None
    for split, n in counts.items():
        entries, end, sums = [], 0, None
        for shard in (s for s in shards if s.split == split):
            side = directory / shard.sidecar
            if not (side.exists() and (directory / shard.file).exists()):
                raise RuntimeError(f"shard {directory / shard.file} is not finished; "
                                   "rerun the job to complete the cache")
            meta = json.loads(side.read_text())
            if any(meta[k] != v for k, v in ident.items()) or meta["start"] != end:
                raise RuntimeError(f"{side} does not continue the {split} split at id {end}")
            if meta["count"] + len(meta["missing"]) != meta["end"] - meta["start"]:
                raise RuntimeError(f"{side}: count {meta['count']} and {len(meta['missing'])} "
                                   "unreadable images do not fill its id range")
            end = meta["end"]
            sums = format.add_sums(sums, meta["sums"])
            entries.append({k: meta[k] for k in ("file", "start", "end", "count", "missing",
                                                 "sha256", "bytes")})
        missing = sorted(i for e in entries for i in e["missing"])
        if end != n or sum(e["count"] for e in entries) + len(missing) != n:
            raise RuntimeError(f"the {split} shards cover ids [0, {end}), not [0, {n})")
        if missing:
            logging.warning("cache_latents: %d %s images could not be read and are left out "
                            "(ids %s, listed in the manifest)", len(missing), split, missing[:10])
        data_split = config.data.train_split if split == "train" else config.data.eval_split
        splits[split] = {"dataset": config.data.name, "dataset_split": data_split,
                         "num_ids": n, "num_examples": n - len(missing), "missing": missing,
                         "stats": format.latent_stats(sums), "shards": entries}
        if split == "train":
            train_sums = sums
    manifest = dict(
        ident,
        encoder_config=format.encoder_identity(config),
        data_config=format.data_identity(config),
        config=json.loads(config.to_json_best_effort()),
        checkpoint={"workdir": os.fspath(checkpoint.run_directory(workdir)),
                    "step": ident["step"]},
        examples_per_shard=int(config.cache.examples_per_shard),
        record=(f"ArrayRecord ({format.WRITER_OPTIONS}); record = header struct "
                f"'{format.HEADER.format}' (magic, id, label, dtype code "
                f"{format.DTYPE_CODES}, array count, h, w, c) + the arrays "
                f"{', '.join(format.FIELDS)} (flip_* only when flip)"),
        splits=splits,
        stats=(None if train_sums is None
               else dict(split="train", **format.latent_stats(train_sums))))
    format.write_json(directory / format.MANIFEST, manifest)
    return manifest


def _complete(directory: epath.Path, ident: dict, counts: dict, config) -> dict | None:
    """The manifest if this exact cache is already complete; an error if it is another one."""
    path = directory / format.MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    have = {k: manifest.get(k) for k in ident} | {
        "splits": {s: e["num_ids"] for s, e in manifest["splits"].items()},
        "examples_per_shard": manifest.get("examples_per_shard")}
    want = dict(ident, splits=counts, examples_per_shard=config.cache.examples_per_shard)
    if have != want:
        diff = [k for k in want if have.get(k) != want[k]]
        raise ConfigError(f"{path} describes another cache (differs in {', '.join(diff)}); "
                          "use another cache.dir")
    return manifest


# --------------------------------------------------------------------------- the job

def run_job(config, workdir: str, model, step: int, params: dict, directory: epath.Path,
            split_sources: dict, mesh: jax.sharding.Mesh, encode: Callable) -> dict:
    """Encodes and writes this process's unfinished shards with the encoder `params` of
    checkpoint `step`, then (process 0) the manifest. `encode` is `make_encoder(model, mesh,
    config.cache.flip)`."""
    counts = {s: len(split_sources[s]) for s in config.cache.splits}
    for split, n in counts.items():
        if n == 0:
            raise ConfigError(f"cache.splits: the {split} split has no examples")
    latent_shape = model.latent_shape
    ident = format.identity(config, step, latent_shape)
    summary = {"cache_dir": os.fspath(directory), "step": step, "examples": counts,
               "latent_shape": list(latent_shape), "dtype": config.cache.dtype}
    directory.mkdir(parents=True, exist_ok=True)
    if (manifest := _complete(directory, ident, counts, config)) is not None:
        logging.info("cache_latents: %s is already complete", directory)
        return dict(summary, shards=sum(len(e["shards"]) for e in manifest["splits"].values()),
                    written=0, images_per_sec=0.0)
    shards = format.plan_shards(counts, config.cache.examples_per_shard)
    mine = shards[jax.process_index()::jax.process_count()]
    pending = [s for s in mine if finished(directory, s, ident) is None]
    logging.info("cache_latents: %d shards in all, %d for this process, %d of them to write",
                 len(shards), len(mine), len(pending))
    rate = 0.0
    if pending:
        local_batch = config.cache.batch_size // jax.process_count()
        params = jax.device_put(params, parallel.replicated(mesh))
        with writer.Writer(directory, pending, ident, config) as out:
            for local in example_stream(config, pending, split_sources, local_batch):
                images = parallel.global_batch({"image": local["image"]}, mesh)["image"]
                out.put(encode(params, images), local)
        rate = out.rate()
    multihost_utils.sync_global_devices("cache_latents: every shard written")
    if jax.process_index() == 0:
        write_manifest(directory, config, ident, workdir, counts, shards)
        logging.info("cache_latents: wrote %s", directory / format.MANIFEST)
    multihost_utils.sync_global_devices("cache_latents: manifest written")
    return dict(summary, shards=len(shards), written=len(pending), images_per_sec=rate)


def cache_latents(config: ml_collections.ConfigDict, workdir: str, task) -> dict:
    """The cache in `cache.dir` of the run in `workdir`."""
    split_sources = {s: sources.cache_source(config, s) for s in config.cache.splits}
    step, params = restore_encoder(config, workdir, config.cache.step)
    mesh = parallel.local_mesh()
    return run_job(config, workdir, task.model, step, params,
                   checkpoint.run_directory(config.cache.dir), split_sources, mesh,
                   make_encoder(task.model, mesh, config.cache.flip))
