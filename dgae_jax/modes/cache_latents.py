"""`--mode=cache_latents`: encode the data once with a trained autoencoder into `cache.dir`
(cache/job.py), or with `cache.benchmark=N`, time that job against its encoder alone
(cache/throughput.py)."""

from __future__ import annotations

import ml_collections

from dgae_jax import checks
from dgae_jax.cache import format, job, throughput
from dgae_jax.modes.base import Mode
from dgae_jax.tasks.ae import AutoencoderTask


def cache_latents(config: ml_collections.ConfigDict, workdir: str, task: AutoencoderTask) -> dict:
    if config.cache.benchmark:
        return throughput.benchmark(config, workdir, task)
    return job.cache_latents(config, workdir, task)


def check(config: ml_collections.ConfigDict, device_count: int | None) -> None:
    c = config.cache
    checks.require(bool(c.dir) or c.benchmark > 0,
                   "cache.dir is required for --mode=cache_latents")
    checks.one_of(c.dtype, tuple(format.DTYPES), "cache.dtype")
    splits = tuple(c.splits)
    checks.require(bool(splits) and len(set(splits)) == len(splits)
                   and set(splits) <= set(format.ROLES),
                   f"cache.splits={splits!r} must be distinct names from {format.ROLES}")
    checks.positive(config, "cache.batch_size", "cache.examples_per_shard",
                    "cache.crops_per_image")
    checks.not_negative(config, "cache.read_threads", "cache.benchmark")
    checks.optional_step(config, "cache.step")
    if device_count is not None:
        checks.require(c.batch_size % device_count == 0,
                       f"cache.batch_size={c.batch_size} (global) is not divisible by the "
                       f"{device_count} devices")


MODE = Mode(cache_latents, ("autoencoder",), check=check)
