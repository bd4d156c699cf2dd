"""`--mode=compile`: compile what a run executes for a TPU slice this machine does not have.

With libtpu installed (jax's TPU extra: `pip install -e '.[tpu]'`), XLA compiles for a Cloud TPU
topology on any host (`jax.experimental.topologies`, as MaxText's train_compile.py does). The
config's mesh is built from the topology's devices as the trainer builds it from real ones, and
what a run executes is lowered at the config's global batch sizes and compiled, without
allocating or running anything:
    train_step    the trainer's own step (every task)
    eval_step     the task's evaluation step: an autoencoder's (or student's) reconstruction at
                  the configured decode setting, the DiT's sampler
    cache_encode  (autoencoders) the latent cache job's encoder, at cache.batch_size

Per executable: XLA's per-chip memory (arguments, outputs, aliased, temporaries, code) against
the chip's HBM, whether it fits (XLA's TPU compiler refuses temporaries larger than HBM; the rest
is added here) and if not what to change; XLA's per-chip FLOPs and bytes accessed (what each fused operation reads and
writes: its estimate of HBM traffic) and the roofline they give, max(FLOPs / peak, bytes /
bandwidth) (chips.py): an estimate of the least step time and the most MFU, as collectives over
ICI/DCN and the input pipeline are not in it; the compile time. XLA counts a loop's body once:
a decode's figures are those of one flow step.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import time

import jax
import ml_collections
from absl import logging

from dgae_jax import chips, checks, parallel
from dgae_jax.cache.job import make_encoder
from dgae_jax.chips import GIB
from dgae_jax.errors import ConfigError
from dgae_jax.modes.cache_latents import MODE as CACHE_LATENTS
from dgae_jax.modes.base import ALL_TASKS, Mode
from dgae_jax.steps import build_steps

# XLA:TPU's refusal of a program larger than HBM, e.g. "... the total memory required for HLO
# temporaries (21.97G) exceeds available HBM (15.75G)."
_OUT_OF_HBM = re.compile(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def target_devices(config: ml_collections.ConfigDict) -> list:
    """The compile-only devices of the slice(s) compile.topology names: nothing runs on them."""
    c = config.compile
    name, _ = chips.tpu_topology(c.topology)
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError("--mode=compile needs libtpu, which jax's TPU extra installs: "
                          "pip install -e '.[tpu]'")
    from jax.experimental import topologies
    slices = {"num_slices": int(c.num_slices)} if c.num_slices > 1 else {}
    try:
        return topologies.get_topology_desc(name, "tpu", **slices).devices
    except jax.errors.JaxRuntimeError as e:
        raise ConfigError(f"compile.topology={c.topology!r}: libtpu cannot build {name} "
                          f"({str(e).splitlines()[0]})") from None


def executables(config: ml_collections.ConfigDict, task, mesh) -> dict:
    """name -> a function lowering it for `mesh` from abstract arguments placed as a run places
    them (the state as the trainer shards it, batches over the batch axes)."""
    fns = build_steps(config, task, mesh)
    repl, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    model = parallel.abstract(task.model, repl)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in task.batch_spec(config.batch_size).items()}
    out = {"train_step": functools.partial(fns.train_step.lower, model, fns.abstract_state,
                                           batch)}
    out.update(task.executables(mesh, fns.abstract_state["ema"]))
    if config.task in CACHE_LATENTS.tasks:  # the job encodes with host (replicated) params
        encoder = parallel.abstract(fns.abstract_state["ema"]["encoder"], repl)
        image = task.batch_spec(config.cache.batch_size)["image"]
        images = jax.ShapeDtypeStruct(image.shape, image.dtype, sharding=batch_sharding)
        encode = make_encoder(task.model, mesh, config.cache.flip)
        out["cache_encode"] = functools.partial(encode.lower, encoder, images)
    return out


def analyse(lower, chip: chips.Chip) -> dict:
    """Lowers and compiles one executable; its memory, cost and roofline per chip."""
    start = time.perf_counter()
    try:
        compiled = lower().compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        record = {"compile_s": time.perf_counter() - start, "fits": False,
                  "error": str(e).splitlines()[0]}
        if found := _OUT_OF_HBM.search(str(e)):
            record.update(temp_gib=float(found[1]), available_gib=float(found[2]))
        return record
    record = {"compile_s": time.perf_counter() - start}
    m = compiled.memory_analysis()
    sizes = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
             "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
             "code": m.generated_code_size_in_bytes}
    sizes["needed"] = (sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
                       + sizes["code"])
    record.update({f"{k}_gib": v / GIB for k, v in sizes.items()})
    record.update(judge(record, chip))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, accessed = float(cost["flops"]), float(cost["bytes accessed"])
    compute_s = flops / (chip.peak_bf16_tflops * 1e12)
    memory_s = accessed / chip.hbm_bytes_per_s
    roofline_s = max(compute_s, memory_s)
    record.update(flops_per_chip=flops, bytes_per_chip=accessed, compute_ms=1000 * compute_s,
                  memory_ms=1000 * memory_s, roofline_ms=1000 * roofline_s,
                  mfu_bound=compute_s / roofline_s if roofline_s else None,
                  bound="compute" if compute_s >= memory_s else "memory")
    return record


def judge(record: dict, chip: chips.Chip) -> dict:
    """Whether a compiled executable fits: XLA:TPU refuses only temporaries larger than HBM, so
    arguments, outputs and code are added here and the whole set against the chip's HBM. For one
    that does not fit, what its temporaries could have: HBM less the rest."""
    if record["needed_gib"] <= chip.hbm_bytes / GIB:
        return {"fits": True}
    rest = record["needed_gib"] - record["temp_gib"]
    return {"fits": False, "available_gib": chip.hbm_bytes / GIB - rest,
            "error": f"needs {record['needed_gib']:.2f} GiB per chip (temporaries "
                     f"{record['temp_gib']:.2f}, the rest {rest:.2f}) of {chip.name}'s "
                     f"{chip.hbm_bytes / GIB:.0f} GiB"}


def advice(config: ml_collections.ConfigDict, record: dict, chips_in_mesh: int) -> str:
    """One line naming what would fit, for an executable that does not: the temporaries scale
    with the batch per chip, the parameters' and optimiser's share with 1 / mesh.fsdp."""
    per_chip = config.batch_size // chips_in_mesh
    options = []
    if "temp_gib" in record and per_chip > 1:
        fit = math.floor(per_chip * max(record["available_gib"], 0) / record["temp_gib"])
        if 0 < fit < per_chip:
            options.append(f"about {fit} images per chip instead of {per_chip} "
                           f"(--config.batch_size={fit * chips_in_mesh})")
    if config.mesh.fsdp != -1 and config.mesh.fsdp < chips_in_mesh:
        options.append(f"--config.mesh.fsdp={chips_in_mesh} --config.mesh.data=1 (shards "
                       "parameters and optimiser state)")
    unet = config.model.get("unet")
    if unet is not None and unet.remat != "blocks":
        options.append("--config.model.unet.remat=blocks (recomputes each block's activations)")
    return "try " + "; or ".join(options) if options else "no setting of this config fits it"


def compile_for_topology(config: ml_collections.ConfigDict, task) -> dict:
    """Every requested executable, compiled in turn and logged as it finishes."""
    c = config.compile
    devices = target_devices(config)
    chip = chips.chip(devices[0].device_kind)
    mesh = parallel.make_mesh(config.mesh, devices)
    lowerers = executables(config, task, mesh)
    wanted = [n.strip() for n in c.executables.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(lowerers))
    if unknown:
        raise ConfigError(f"compile.executables: {', '.join(unknown)} not in this config's "
                          f"executables ({', '.join(lowerers)})")
    logging.info("compile: %s%s (%s, %d chips of %s) as mesh %s", c.topology,
                 f" x {c.num_slices} slices" if c.num_slices > 1 else "",
                 chips.tpu_topology(c.topology)[0], len(devices), chip.name, dict(mesh.shape))
    results = {}
    for name in wanted or lowerers:
        results[name] = record = analyse(lowerers[name], chip)
        if not record["fits"]:
            record["advice"] = advice(config, record, len(devices))
        logging.info("compile %s: %s", name, _brief(record, chip))
    return {"config": config.name, "topology": c.topology, "num_slices": int(c.num_slices),
            "libtpu_topology": chips.tpu_topology(c.topology)[0], "chips": len(devices),
            "hosts": len({d.process_index for d in devices}), "chip": chip.name,
            "device_kind": devices[0].device_kind, "hbm_gib": chip.hbm_bytes / GIB,
            "peak_bf16_tflops": chip.peak_bf16_tflops,
            "hbm_gb_per_s": chip.hbm_bytes_per_s / 1e9, "mesh": dict(mesh.shape),
            "batch_size": config.batch_size, "executables": results}


def _brief(record: dict, chip: chips.Chip) -> str:
    if not record["fits"]:
        return f"does not fit ({record['error']}); {record['advice']}"
    return (f"fits, compiled in {record['compile_s']:.0f} s; needs {record['needed_gib']:.2f} of "
            f"{chip.hbm_bytes / GIB:.0f} GiB per chip (temporaries {record['temp_gib']:.2f}); "
            f"{record['flops_per_chip'] / 1e12:.2f} TFLOP and "
            f"{record['bytes_per_chip'] / 1e9:.1f} GB per chip: at least "
            f"{record['roofline_ms']:.1f} ms ({record['bound']}-bound), MFU at most "
            f"{100 * record['mfu_bound']:.0f}%")


def check(config: ml_collections.ConfigDict, device_count: int | None) -> None:
    c = config.compile
    checks.require(bool(c.topology), "compile.topology is required: a Cloud TPU accelerator "
                   "type such as v5p-32, v5litepod-16 or v6e-16")
    chips.tpu_topology(c.topology)
    checks.positive(config, "compile.num_slices")


MODE = Mode(compile_for_topology, ALL_TASKS, workdir=False, check=check, cluster=False,
            target=target_devices)
