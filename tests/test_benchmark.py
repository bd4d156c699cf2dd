"""--mode=benchmark: every component is timed with its FLOPs; a decode's FLOPs (evaluations x
the U-Net's, as XLA counts a loop body once) agree with XLA's own count of an unrolled decode."""

import jax
import pytest
from fakes import ldm_train_config

from dgae_jax.costs import hlo_flops
from dgae_jax.errors import ConfigError
from dgae_jax.modes import benchmark
from dgae_jax.tasks.registry import make_task


@pytest.mark.slow
def test_components_timed_and_decode_flops_match_xla(tiny_config):
    cfg = tiny_config(factor=8, size=16)
    cfg.batch_size = 8
    cfg.benchmark.update(steps=1, batch_size=8, decode_steps=(2, 6),  # 1 image per device
                         components="unet,decode_2,decode_6")
    cfg.diffusion.sampler = "heun"  # 2 evaluations per step
    task = make_task(cfg, "benchmark")
    record = benchmark.benchmark(cfg, task)
    comps = record["components"]
    assert list(comps) == ["unet", "decode_2", "decode_6"]
    assert record["devices"] == 8 and record["inference_batch_size"] == 8
    assert record["peak_bf16_tflops"] is None
    for c in comps.values():
        assert c["time_ms"] > 0 and c["flops"] > 0 and c["mfu"] is None
        assert c["images_per_sec"] == pytest.approx(8000 / c["time_ms"])
    unet = comps["unet"]["flops"]
    assert comps["decode_6"]["flops"] == 12 * unet
    # Two Heun steps are unrolled (no loop), so XLA counts all four evaluations itself.
    model = task.model
    params = jax.jit(model.init)(jax.random.key(0))
    z = jax.numpy.zeros((8, *model.latent_shape))
    xla = hlo_flops(jax.jit(lambda p, z: model.decode(p, z, jax.random.key(0), steps=2))
                    .lower(params, z))
    assert comps["decode_2"]["flops"] == pytest.approx(xla, rel=0.01)


def test_ldm_train_step_and_dit(tmp_path):
    cfg = ldm_train_config()
    cfg.benchmark.update(steps=1)
    record = benchmark.benchmark(cfg, make_task(cfg, "benchmark"))
    assert list(record["components"]) == ["train_step", "dit"]
    step = record["components"]["train_step"]
    assert step["time_ms"] > 0 and step["flops"] > record["components"]["dit"]["flops"] > 0


def test_unknown_component_stops_before_any_work(tiny_config):
    cfg = tiny_config()
    cfg.model.decoder = "conv"
    cfg.benchmark.components = "unet"
    with pytest.raises(ConfigError, match=r"benchmark.components: unet not in this config's "
                                          r"components \(train_step, encoder, conv_decoder\)"):
        benchmark.benchmark(cfg, make_task(cfg, "benchmark"))
