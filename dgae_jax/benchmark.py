"""`--mode=benchmark`: time the exact train step the trainer runs, on synthetic batches.

Reports step time, images/s (total and per device), XLA's FLOP count of the compiled step and the
FLOP rate it implies, and peak device memory where the backend reports it. Synthetic data keeps
the input pipeline out of the measurement; the trainer's logged throughput includes it.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from absl import logging

from dgae_jax import parallel
from dgae_jax.steps import build_steps, compile_train_step, describe_compiled


def synthetic_batch(config: ml_collections.ConfigDict, task, mesh) -> dict:
    """Random data of the task's batch layout: uint8 pixels, normal floats, zero labels."""
    local = config.batch_size // jax.process_count()
    rng = np.random.default_rng(0)

    def fill(spec):
        shape = (local, *spec.shape[1:])
        if spec.dtype == np.uint8:
            return rng.integers(0, 256, shape, dtype=np.uint8)
        if np.issubdtype(spec.dtype, np.floating):
            return rng.standard_normal(shape).astype(spec.dtype)
        return np.zeros(shape, spec.dtype)

    specs = task.batch_spec(config.batch_size)
    return parallel.global_batch({k: fill(v) for k, v in specs.items()}, mesh)


def benchmark(config: ml_collections.ConfigDict, task) -> dict:
    """`config.benchmark_steps` timed steps after one warm-up; 0 only compiles (the compile
    time and the memory analysis of the step, e.g. for a model too slow to run here)."""
    mesh = parallel.make_mesh(config.mesh)
    fns = build_steps(config, task, mesh)
    model = jax.device_put(task.model, parallel.replicated(mesh))
    state = fns.init(model, jax.random.key(config.seed))
    batch = synthetic_batch(config, task, mesh)
    compiled, compile_report = compile_train_step(fns, model, state, batch)
    flops = compile_report["flops"]
    logging.info("%s", describe_compiled(compile_report))
    record = {
        "config": config.name, "devices": mesh.size, "device_kind": jax.devices()[0].device_kind,
        "batch_size": config.batch_size, "dtype": config.model.dtype,
        "compile_s": round(compile_report["compile_s"], 1), "train_step_flops": flops,
        **{k: v for k, v in compile_report.items() if k.endswith("_bytes")},
    }
    steps = config.get("benchmark_steps", 10)
    if not steps:
        return record
    state, metrics = compiled(model, state, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.time()
    for _ in range(steps):
        state, metrics = compiled(model, state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.time() - start) / steps
    stats = jax.local_devices()[0].memory_stats() or {}
    record.update({
        "step_time_ms": 1000 * step_s, "examples_per_sec": config.batch_size / step_s,
        "examples_per_sec_per_device": config.batch_size / step_s / mesh.size,
        "tflops_per_sec_per_device": flops / step_s / 1e12 / mesh.size,
        "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "loss": float(metrics["loss"]),
    })
    return record
