"""--mode=compile: what a run executes, compiled for a TPU slice this machine does not have
(libtpu's compile-only devices), on the trainer's own mesh layout, with XLA's memory and cost
checked against the same programs compiled for as many CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fakes import ldm_train_config
from helpers import OVERRIDES, make_tiny_config, override, save_run
from jax.sharding import NamedSharding, PartitionSpec as P

from dgae_jax import chips, config_lib, main, parallel, validation
from dgae_jax.errors import ConfigError
from dgae_jax.modes import compile_tpu
from dgae_jax.tasks.distill import DistillationTask
from dgae_jax.tasks.registry import make_task


def tiny(topology="v5e:2x2", data=2, fsdp=2, **compile_fields):
    cfg = make_tiny_config(8)
    cfg.batch_size = cfg.cache.batch_size = 8
    cfg.mesh.update(data=data, fsdp=fsdp)
    cfg.compile.update(topology=topology, **compile_fields)
    return cfg


def coords(mesh):
    return np.vectorize(lambda d: tuple(d.coords), otypes=[object])(mesh.devices)


@pytest.mark.parametrize("data, fsdp", [(4, 1), (2, 2), (1, 4), (-1, 2)])
def test_the_topology_mesh_is_the_trainers_layout(data, fsdp):
    """The mode builds its mesh with the trainer's function from the topology's devices: the
    shape and axes a run on 4 real devices gets, every chip once, each fsdp group (a row) a set
    of neighbouring chips (one ICI hop apart)."""
    cfg = tiny(data=data, fsdp=fsdp)
    devices = compile_tpu.target_devices(cfg)
    mesh = parallel.make_mesh(cfg.mesh, devices)
    cpu = parallel.make_mesh(cfg.mesh, jax.devices()[:4])
    assert (mesh.axis_names, dict(mesh.shape)) == (cpu.axis_names, dict(cpu.shape))
    assert sorted(mesh.device_ids.ravel()) == [d.id for d in devices]
    for row in coords(mesh):
        for a, b in zip(row, row[1:]):
            assert sum(abs(x - y) for x, y in zip(a, b)) == 1, coords(mesh)


def test_multislice_keeps_fsdp_inside_a_slice():
    """Two v5e 2x2 slices (mesh.dcn_data=2): the data axis spans the slices in blocks, every
    fsdp group stays inside one, and each slice's block is laid out as the one-slice mesh."""
    cfg = tiny(num_slices=2, data=4, fsdp=2)
    cfg.mesh.dcn_data = 2
    devices = compile_tpu.target_devices(cfg)
    validation.validate(cfg, "compile", device_count=len(devices),
                        process_count=len({d.process_index for d in devices}))
    mesh = parallel.make_mesh(cfg.mesh, devices)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert slices.tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]
    one = parallel.make_mesh(tiny().mesh, compile_tpu.target_devices(tiny()))
    assert (coords(mesh)[:2] == coords(one)).all() and (coords(mesh)[2:] == coords(one)).all()


def test_refusals(monkeypatch):
    with pytest.raises(ConfigError, match="compile.topology is required"):
        validation.validate(tiny(topology=""), "compile")
    with pytest.raises(ConfigError, match="compile.topology='v5p-33' is not a slice"):
        validation.validate(tiny(topology="v5p-33"), "compile")
    with pytest.raises(ConfigError, match="compile.num_slices"):
        validation.validate(tiny(num_slices=0), "compile")
    cfg = tiny(data=8)  # the topology has 4 chips
    with pytest.raises(ConfigError, match="mesh.data x mesh.fsdp = 8 x 2 .* 4 devices"):
        main.run(cfg, "compile", None)
    with pytest.raises(ConfigError, match="compile.executables: decode not in this config's "
                       "executables \\(train_step, eval_step, cache_encode\\)"):
        main.run(tiny(executables="train_step,decode"), "compile", None)
    real_find_spec = compile_tpu.importlib.util.find_spec
    monkeypatch.setattr(compile_tpu.importlib.util, "find_spec",
                        lambda name: None if name == "libtpu" else real_find_spec(name))
    with pytest.raises(ConfigError, match=r"needs libtpu.*pip install -e '\.\[tpu\]'"):
        main.run(tiny(), "compile", None)


def test_a_program_larger_than_hbm_is_reported_with_what_it_needs():
    """XLA:TPU refuses, at compile time, a program whose temporaries exceed the chip's HBM: the
    record says so with XLA's figures, and the advice names settings of the config."""
    devices = compile_tpu.target_devices(tiny())
    mesh = jax.make_mesh((4,), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.ShapeDtypeStruct((2**18,), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    # 2**16 x 2**15 float32 per chip twice over (16 GiB), two cumulative sums that keep them
    big = jax.jit(lambda x: jnp.cumsum(jnp.outer(x, x[:2**15]), axis=0)[::4096]
                  + jnp.cumsum(jnp.outer(x, x[:2**15]) ** 2, axis=1)[::4096])
    record = compile_tpu.analyse(lambda: big.lower(x), chips.chip(devices[0].device_kind))
    assert not record["fits"] and record["error"].startswith("RESOURCE_EXHAUSTED")
    assert record["temp_gib"] > record["available_gib"] and 15 < record["available_gib"] <= 16
    chip = chips.chip("TPU v5 lite")  # compiled, but arguments + temporaries + code > HBM
    assert compile_tpu.judge({"needed_gib": 16.5, "temp_gib": 13.8}, chip) == {
        "fits": False, "available_gib": pytest.approx(13.3),
        "error": "needs 16.50 GiB per chip (temporaries 13.80, the rest 2.70) of TPU v5e's 16 GiB"}
    assert compile_tpu.judge({"needed_gib": 15.9, "temp_gib": 13.8}, chip) == {"fits": True}
    cfg = tiny()
    cfg.batch_size = 64  # 16 images per chip
    advice = compile_tpu.advice(cfg, {"temp_gib": 40.0, "available_gib": 16.0}, 4)
    assert advice == ("try about 6 images per chip instead of 16 (--config.batch_size=24); or "
                      "--config.mesh.fsdp=4 --config.mesh.data=1 (shards parameters and optimiser "
                      "state); or --config.model.unet.remat=blocks (recomputes each block's "
                      "activations)")


def student(tmp_path):
    teacher_cfg = override(config_lib.autoencoder_config(16, "demo"), OVERRIDES)
    save_run(tmp_path / "teacher", teacher_cfg, 3)
    cfg = config_lib.distill_config("demo")
    cfg.distill.teacher = str(tmp_path / "teacher")
    DistillationTask.complete_config(cfg, {})
    return cfg


@pytest.mark.parametrize("which", ["diffusion", "conv", "ldm", "distill"])
def test_every_task_lowers_what_its_runs_execute(which, tmp_path):
    """Each task's executables lower for the topology's mesh (shapes and shardings agree): the
    trainer's step, its evaluation step, and an autoencoder's cache encoder."""
    cfg = {"diffusion": lambda: make_tiny_config(8), "conv": lambda: make_tiny_config(8, "conv"),
           "ldm": ldm_train_config, "distill": lambda: student(tmp_path)}[which]()
    cfg.compile.topology = "v5e:2x2"
    mesh = parallel.make_mesh(cfg.mesh, compile_tpu.target_devices(cfg))
    lowerers = compile_tpu.executables(cfg, make_task(cfg, "compile"), mesh)
    expected = ["train_step", "eval_step"] + (["cache_encode"] if which in ("diffusion", "conv")
                                              else [])
    assert list(lowerers) == expected
    for lower in lowerers.values():
        assert isinstance(lower(), jax.stages.Lowered)


def cpu_figures(cfg) -> dict:
    """The same executables compiled for 4 CPU devices: (needed bytes, FLOPs) per device."""
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:4])
    out = {}
    for name, lower in compile_tpu.executables(cfg, make_task(cfg, "compile"), mesh).items():
        compiled = lower().compile()
        m, cost = compiled.memory_analysis(), compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out[name] = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                     + m.temp_size_in_bytes, cost["flops"])
    return out


@pytest.mark.slow  # XLA:TPU compiles the tiny autoencoder's three programs in about a minute
def test_a_tiny_autoencoder_compiled_for_v5e_agrees_with_cpu():
    """A v5e 2x2 slice against 4 CPU devices, same mesh (2 x 2) and batch: per-chip FLOPs within
    0.8-1.5x (both count the partitioned HLO; TPU's fusions count a little more) and per-chip
    memory within 0.7-2x (XLA:TPU pads each array's two minor dimensions to its 8 x 128 tiles,
    which at these 8-channel widths costs more than at real ones); and the report's own
    arithmetic: the roofline is the slower of FLOPs at the peak and bytes at the bandwidth."""
    cfg = tiny()
    record = main.run(cfg, "compile", None)
    assert record | {"executables": None} == {
        "config": cfg.name, "topology": "v5e:2x2", "num_slices": 1, "libtpu_topology": "v5e:2x2",
        "chips": 4, "hosts": 1, "chip": "TPU v5e", "device_kind": "TPU v5 lite", "hbm_gib": 16,
        "peak_bf16_tflops": 197, "hbm_gb_per_s": 819, "mesh": {"data": 2, "fsdp": 2},
        "batch_size": 8, "executables": None}
    cpu = cpu_figures(cfg)
    assert list(record["executables"]) == list(cpu) == ["train_step", "eval_step",
                                                        "cache_encode"]
    for name, r in record["executables"].items():
        needed, flops = cpu[name]
        assert r["fits"] and r["compile_s"] > 0
        assert 0.8 < r["flops_per_chip"] / flops < 1.5, (name, r["flops_per_chip"], flops)
        if name != "cache_encode":  # under a megabyte, all tile padding
            tpu_needed = (r["needed_gib"] - r["code_gib"]) * 2**30
            assert 0.7 < tpu_needed / needed < 2.0, (name, tpu_needed, needed)
        compute = r["flops_per_chip"] / 197e12 * 1000
        memory = r["bytes_per_chip"] / 819e9 * 1000
        assert r["roofline_ms"] == pytest.approx(max(compute, memory))
        assert r["mfu_bound"] == pytest.approx(compute / max(compute, memory))


def test_a_tiny_dit_compiles_for_v5e():
    cfg = ldm_train_config()
    cfg.compile.topology = "v5litepod-4"
    cfg.sample.classes = ()  # the fake has 4 classes
    record = main.run(cfg, "compile", None)
    assert record["chips"] == 4 and record["mesh"] == {"data": 4, "fsdp": 1}
    assert list(record["executables"]) == ["train_step", "eval_step"]
    assert all(r["fits"] and r["flops_per_chip"] > 0 for r in record["executables"].values())
