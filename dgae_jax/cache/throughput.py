"""The caching job's throughput next to its encoder's alone (`--mode=cache_latents
--config.cache.benchmark=N`), to show how close the host side (decoding, fetching, writing)
keeps the job to the device's speed."""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np
from etils import epath

from dgae_jax import parallel
from dgae_jax.cache import job
from dgae_jax.data import pipeline, sources


class Cycled:
    """The first n examples of `source` repeated: a dataset of any size for timing."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.source[i % len(self.source)]


def benchmark(config, workdir: str, task) -> dict:
    """Caching throughput (the real job on `cache.benchmark` train images, cycled, written to a
    temporary directory) next to the jitted encoder alone on one device-resident batch, both at
    `cache.batch_size` and without the first (compiling) batch. The encoder alone is timed
    before and after the job and averaged, so a drifting load on a shared host biases neither."""
    step, params = job.restore_encoder(config, workdir, config.cache.step)
    n, batch = config.cache.benchmark, config.cache.batch_size
    source = Cycled(sources.cache_source(config, "train"), n)
    mesh = parallel.local_mesh()
    encode = job.make_encoder(task.model, mesh, config.cache.flip)
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
        record = job.run_job(bench, workdir, task.model, step, params, epath.Path(tmp),
                             {"train": source}, mesh, encode)
        total_s = time.time() - start
        size = sum(os.path.getsize(p) for p in epath.Path(tmp).glob("*.array_record"))
    encode_rate = (before + encoder_alone()) / 2
    return {"config": config.name, "image_size": config.image_size,
            "latent_shape": record["latent_shape"], "dtype": config.cache.dtype,
            "flip": bool(config.cache.flip), "batch_size": batch, "devices": mesh.size,
            "device_kind": jax.devices()[0].device_kind, "images": n,
            "cache_images_per_sec": record["images_per_sec"],
            "encode_images_per_sec": encode_rate,
            "cache_vs_encode": record["images_per_sec"] / encode_rate,
            "total_s_with_compile": total_s, "bytes_per_1000_images": 1000 * size / n}
