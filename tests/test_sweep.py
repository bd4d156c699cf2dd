"""--mode=sweep: every decode setting of the grid evaluated as --mode=eval would, its NFE, the JSON
and the plot; and NFE counted against the samplers themselves."""

import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import pytest
from PIL import Image

from dgae_jax import config_lib, diffusion, modes, validation
from dgae_jax.errors import ConfigError
from dgae_jax.modes import sweep

from helpers import make_tiny_config, save_run

STEP = 3


def sweep_config():
    cfg = make_tiny_config(8, "diffusion", size=32, c=4)
    cfg.batch_size = 8  # one example per CPU device
    cfg.data.name = "embedded"
    cfg.data.eval_size = 16  # two batches: the second one is timed
    cfg.eval.sweep_steps = (1, 2)
    return cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint (step 3) of a tiny DGAE, saved once for the module."""
    workdir = tmp_path_factory.mktemp("sweep") / "run"
    save_run(workdir, sweep_config(), STEP)
    return workdir


def run_sweep(saved, tmp_path, **grid):
    """--mode=sweep in-process on a copy of the saved run, over `grid` (eval.sweep_* fields)."""
    workdir = tmp_path / "run"
    shutil.copytree(saved, workdir)
    cfg = sweep_config()
    cfg.eval.update(grid)
    record = modes.run(cfg, "sweep", str(workdir))
    return str(workdir), record


def eval_at(workdir, steps, sampler, spacing):
    """--mode=eval in-process with the config's decode fields set to one setting."""
    cfg = sweep_config()
    cfg.diffusion.update(sample_steps=steps, sampler=sampler, spacing=spacing)
    results = modes.run(cfg, "eval", workdir)
    assert results["step"] == STEP
    assert (results["decode_steps"], results["sampler"], results["spacing"]) == (
        steps, sampler, spacing)
    return results


def assert_same_metrics(row, results):
    for key in ("psnr", "ssim", "lpips"):
        assert results[key] == pytest.approx(row[key], rel=1e-5, abs=1e-6), key
    assert results["num_images"] == row["num_images"]


def test_one_setting_equals_mode_eval_and_writes_json_and_plot(saved, tmp_path):
    workdir, record = run_sweep(saved, tmp_path, sweep_steps=(2,), sweep_samplers=("heun",),
                                sweep_spacings=("reversed_log",))
    # The sweep leaves --mode=eval's reconstruction grid alone.
    assert not os.path.exists(f"{workdir}/images/{STEP}.png")
    [row] = record["rows"]
    assert (row["steps"], row["sampler"], row["spacing"], row["nfe"]) == (2, "heun",
                                                                          "reversed_log", 4)
    assert row["num_images"] == 16 and 0 < row["psnr"] < 60 and -1 <= row["ssim"] <= 1
    assert row["lpips"] > 0 and "rfid" not in row  # eval.rfid is off in the tiny config
    assert set(row["bootstrap_std"]) == {"psnr", "ssim", "lpips"}
    assert all(s > 0 for s in row["bootstrap_std"].values())  # 16 different images
    assert row["seconds_per_image"] > 0  # the second batch; the first one compiled
    assert record["json"] == f"{workdir}/eval/sweep-{STEP}.json"
    assert record["png"] == f"{workdir}/eval/sweep-{STEP}.png"
    saved_record = json.load(open(record["json"]))
    assert saved_record["rows"] == record["rows"] and saved_record["step"] == STEP
    assert "first" in saved_record["timing"]  # says that the compiling batch is left out
    with Image.open(record["png"]) as image:
        image.verify()
    with Image.open(record["png"]) as image:
        assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 200
    assert_same_metrics(row, eval_at(workdir, 2, "heun", "reversed_log"))


def test_a_tagged_evaluation_keeps_its_files_apart(saved, tmp_path):
    """eval.tag: a sweep or an evaluation at other settings (other crops, another decode
    setting) writes beside the run's own files instead of over them."""
    workdir, record = run_sweep(saved, tmp_path, sweep_steps=(1,), sweep_samplers=("euler",),
                                sweep_spacings=("uniform",), tag="other")
    assert record["json"] == f"{workdir}/eval/sweep-{STEP}-other.json"
    assert os.path.exists(record["json"]) and os.path.exists(record["png"])
    cfg = sweep_config()
    cfg.eval.tag = "other"
    modes.run(cfg, "eval", workdir)
    assert sorted(os.listdir(f"{workdir}/eval")) == [
        f"{STEP}-other.json", f"sweep-{STEP}-other.json", f"sweep-{STEP}-other.png"]
    assert os.listdir(f"{workdir}/images") == [f"{STEP}-other.png"]


@pytest.mark.slow
def test_every_setting_once_with_its_nfe(saved, tmp_path):
    workdir, record = run_sweep(saved, tmp_path)  # (1, 2) x both samplers x both spacings
    rows = record["rows"]
    assert record["step"] == STEP and len(rows) == 8
    assert [(r["steps"], r["sampler"], r["spacing"]) for r in rows] == [
        (n, s, t) for s in diffusion.SAMPLERS for t in diffusion.SPACINGS for n in (1, 2)]
    for r in rows:
        assert r["nfe"] == r["steps"] * (2 if r["sampler"] == "heun" else 1)
        assert r["num_images"] == 16 and 0 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1
        assert r["lpips"] > 0 and r["seconds_per_image"] > 0
    psnr = {(r["steps"], r["sampler"], r["spacing"]): r["psnr"] for r in rows}
    for sampler in diffusion.SAMPLERS:  # one step spans [1, 0] whatever the spacing
        assert psnr[1, sampler, "uniform"] == pytest.approx(psnr[1, sampler, "reversed_log"],
                                                           rel=1e-5)
        assert psnr[2, sampler, "uniform"] != psnr[2, sampler, "reversed_log"]
    for steps, spacing in [(1, "uniform"), (2, "uniform"), (2, "reversed_log")]:
        assert psnr[steps, "euler", spacing] != psnr[steps, "heun", spacing]
    assert psnr[1, "euler", "uniform"] != psnr[2, "euler", "uniform"]
    assert json.load(open(record["json"]))["rows"] == rows
    with Image.open(record["png"]) as image:
        image.verify()
    assert_same_metrics(rows[0], eval_at(workdir, 1, "euler", "uniform"))


def test_plot_has_an_rfid_panel_when_rows_have_rfid():
    rows = [{"steps": n, "sampler": s, "spacing": "uniform", "nfe": diffusion.nfe(n, s),
             "psnr": 20.0 + n, "lpips": 0.5 / n, "rfid": 10.0 / n}
            for n in (1, 2, 4) for s in diffusion.SAMPLERS]
    with_rfid = Image.open(io.BytesIO(sweep.plot(rows)))
    without = Image.open(io.BytesIO(
        sweep.plot([{k: v for k, v in r.items() if k != "rfid"} for r in rows])))
    assert with_rfid.size[0] > without.size[0]  # three panels against two


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
@pytest.mark.parametrize("steps", [1, 3])
def test_nfe_counts_the_samplers_network_calls(sampler, steps):
    calls = []

    def velocity(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return -x

    jax.block_until_ready(diffusion.sample(velocity, jnp.ones((1, 2, 2, 3)), steps, sampler))
    jax.effects_barrier()
    assert len(calls) == diffusion.nfe(steps, sampler)


def test_the_default_diffusion_configs_pass_validation_for_sweep(tmp_path):
    for factor in (8, 16, 32):
        for arg in ("", "c=8,size=M", "demo"):
            cfg = config_lib.autoencoder_config(factor, arg)
            assert cfg.eval.sweep_steps == (1, 2, 4, 8, 16, 25, 50)
            validation.validate(cfg, "sweep", workdir=str(tmp_path), device_count=8)
    with pytest.raises(ConfigError, match="--workdir is required for --mode=sweep"):
        validation.validate(config_lib.autoencoder_config(16, "demo"), "sweep", workdir=None)
