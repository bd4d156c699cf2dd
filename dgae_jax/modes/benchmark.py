"""`--mode=benchmark`: time the train step and each inference component on synthetic inputs.

Components (`config.benchmark.components`, comma-separated; "" = all the config has): the exact
train step the trainer runs (forward, backward, optimizer, EMA), then the task's inference
components (`Task.benchmark_names`):
    autoencoder    encoder (posterior moments), unet (one U-Net forward, the unit of a DGAE
                   decode), decode_N (a whole DGAE decode of N flow steps, N in
                   `benchmark.decode_steps`), conv_decoder (the SD-VAE baseline's decoder at
                   the same latent shape, fresh parameters)
    ldm            dit (one DiT forward)
    distill        none: the student's inference is the autoencoder's

Each reports compile time, time per call, images/s, XLA's FLOP count of the call, TFLOP/s per
device, MFU against the device's dense bf16 peak (chips.py; none on CPU), XLA's memory
analysis of the compiled call and the device's peak memory so far. Synthetic data keeps the
input pipeline out of the measurement; the trainer's logged throughput includes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from dgae_jax import checks, parallel
from dgae_jax.chips import peak_tflops
from dgae_jax.costs import GIB, hlo_flops
from dgae_jax.errors import ConfigError
from dgae_jax.modes.base import ALL_TASKS, Mode
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


def synthetic_inputs(config: ml_collections.ConfigDict, mesh) -> Callable:
    """data(*shape, dtype=float32, fill=None): a global batch of the benchmark batch size,
    sharded over the mesh's batch axes, of normal values or `fill`."""
    batch = config.benchmark.batch_size or config.batch_size
    rng = np.random.default_rng(1)

    def data(*shape, dtype=np.float32, fill=None):
        local = (batch // jax.process_count(), *shape)
        values = rng.standard_normal(local) if fill is None else np.full(local, fill)
        return parallel.global_batch({"x": values.astype(dtype)}, mesh)["x"]
    return data


def _utilisation(flops: float, seconds: float, devices: int, peak: float | None) -> dict:
    per_device = flops / seconds / 1e12 / devices
    return {"tflops_per_sec_per_device": per_device,
            "mfu": per_device / peak if peak else None}


def _peak_memory_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None


def time_component(fn, args, *, steps: int, images: int, devices: int, peak: float | None,
                   flops: float | None = None) -> dict:
    """Compiles `fn(*args)` once, then times `steps` calls queued back to back (no host sync
    between them, as a decode loop over batches runs); 0 steps only compiles. `flops` replaces
    XLA's count of the call."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    compiled = lowered.compile()
    record = {"compile_s": time.perf_counter() - start, "flops": flops or hlo_flops(lowered)}
    memory = compiled.memory_analysis()
    if memory is not None:
        record["needed_gib"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / GIB
    if not steps:
        return record
    start = time.perf_counter()
    outputs = [compiled(*args) for _ in range(steps)]
    jax.block_until_ready(outputs)
    seconds = (time.perf_counter() - start) / steps
    record.update({"time_ms": 1000 * seconds, "images_per_sec": images / seconds,
                   **_utilisation(record["flops"], seconds, devices, peak),
                   "peak_memory_gib": _peak_memory_gib()})
    return record


def _time_train_step(config, fns, model, state, batch, mesh, peak) -> dict:
    """The trainer's own compiled step (donating the state): one warm-up, then timed steps."""
    compiled, report = compile_train_step(fns, model, state, batch)
    logging.info("%s", describe_compiled(report))
    record = {"compile_s": report["compile_s"], "flops": report["flops"]}
    if "needed_bytes" in report:
        record["needed_gib"] = report["needed_bytes"] / GIB
    steps = config.benchmark.steps
    if steps:
        state, metrics = compiled(model, state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(model, state, batch)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / steps
        record.update({"time_ms": 1000 * seconds, "images_per_sec": config.batch_size / seconds,
                       **_utilisation(report["flops"], seconds, mesh.size, peak),
                       "peak_memory_gib": _peak_memory_gib(), "loss": float(metrics["loss"])})
    return record


def benchmark(config: ml_collections.ConfigDict, task) -> dict:
    """Every requested component, in order, each logged as it finishes."""
    b = config.benchmark
    names = ("train_step", *task.benchmark_names())
    wanted = [n.strip() for n in b.components.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ConfigError(f"benchmark.components: {', '.join(unknown)} not in this config's "
                          f"components ({', '.join(names)})")
    names = [n for n in names if n in wanted] if wanted else names
    mesh = parallel.make_mesh(config.mesh)
    kind = jax.devices()[0].device_kind
    peak = peak_tflops(kind)
    fns = build_steps(config, task, mesh)
    model = jax.device_put(task.model, parallel.replicated(mesh))
    key = jax.random.key(config.seed)
    # Fresh parameters for the inference components, sharded as the trainer shards them.
    params = jax.jit(task.init_params, out_shardings=fns.state_shardings["params"])(model, key)
    components = {}
    if "train_step" in names:
        state = fns.init(model, key)
        batch = synthetic_batch(config, task, mesh)
        components["train_step"] = _time_train_step(config, fns, model, state, batch, mesh, peak)
        logging.info("benchmark train_step: %s", _brief(components["train_step"]))
    images = b.batch_size or config.batch_size
    inference = task.benchmark_components([n for n in names if n != "train_step"], params, mesh,
                                          synthetic_inputs(config, mesh))
    for name, (fn, args, flops) in inference.items():
        components[name] = time_component(fn, args, steps=b.steps, images=images,
                                          devices=mesh.size, peak=peak, flops=flops)
        logging.info("benchmark %s: %s", name, _brief(components[name]))
    return {"config": config.name, "devices": mesh.size, "device_kind": kind,
            "peak_bf16_tflops": peak, "dtype": config.model.dtype,
            "batch_size": config.batch_size, "inference_batch_size": images,
            "components": components}


def _brief(record: dict) -> str:
    parts = [f"compiled in {record['compile_s']:.1f} s", f"{record['flops'] / 1e9:.1f} GFLOP"]
    if "time_ms" in record:
        parts += [f"{record['time_ms']:.1f} ms", f"{record['images_per_sec']:.2f} images/s"]
        if record["mfu"] is not None:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
    return ", ".join(parts)


def check(config: ml_collections.ConfigDict, device_count: int | None) -> None:
    b = config.benchmark
    checks.not_negative(config, "benchmark.steps", "benchmark.batch_size")
    checks.require(all(n > 0 for n in b.decode_steps),
                   f"benchmark.decode_steps={tuple(b.decode_steps)} must all be positive")
    if device_count is not None:
        checks.require(b.batch_size % device_count == 0,
                       f"benchmark.batch_size={b.batch_size} (global) is not divisible by the "
                       f"{device_count} devices")


MODE = Mode(benchmark, ALL_TASKS, workdir=False, check=check)
