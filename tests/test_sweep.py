"""--mode=sweep: every decode setting of the grid evaluated as --mode=eval would, its NFE, the JSON
and the plot; and NFE counted against the samplers themselves."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config
from PIL import Image

from dgae_jax import checkpoint, diffusion, modes, parallel, sweep
from dgae_jax.steps import build_steps
from dgae_jax.tasks.ae import AutoencoderTask

STEP = 3


def sweep_config():
    cfg = make_tiny_config(8, "diffusion", size=32, c=4)
    cfg.batch_size = 8  # one example per CPU device
    cfg.data.name = "embedded"
    cfg.data.eval_size = 16  # two batches: the second one is timed
    cfg.eval.sweep_steps = (1, 2)
    return cfg


def synthetic_state(abstract):
    """Random weights made in numpy (compiling the real init takes longer than the sweep)."""
    rng = np.random.default_rng(0)

    def leaf(path, a):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return np.zeros(a.shape, a.dtype)
        if parallel.path_name(path).endswith("scale"):
            return np.ones(a.shape, a.dtype)
        fan_in = int(np.prod(a.shape[:-1])) or 1
        return (rng.standard_normal(a.shape) / np.sqrt(fan_in)).astype(a.dtype)

    state = jax.tree_util.tree_map_with_path(leaf, abstract)
    state["ema"] = jax.tree.map(lambda p: 0.9 * p + 0.02, state["params"])
    return state


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint (step 3) of a tiny DGAE and its sweep over (1, 2) steps x both samplers x
    both spacings, made in-process on the 8 CPU devices."""
    cfg = sweep_config()
    task = AutoencoderTask(cfg, "sweep")
    state = synthetic_state(build_steps(cfg, task, parallel.make_mesh(cfg.mesh)).abstract_state)
    workdir = str(tmp_path_factory.mktemp("sweep") / "run")
    ckpt = checkpoint.Checkpoints(workdir, cfg)
    ckpt.save(STEP, state, iter(task.train_data(0, 1)), force=True)
    ckpt.close()
    record = modes.MODES["sweep"](cfg, workdir, task)
    return cfg, workdir, record


def test_every_setting_once_with_its_nfe(run):
    cfg, workdir, record = run
    rows = record["rows"]
    assert record["step"] == STEP and len(rows) == 8
    assert {(r["steps"], r["sampler"], r["spacing"]) for r in rows} == {
        (n, s, t) for n in (1, 2) for s in diffusion.SAMPLERS for t in diffusion.SPACINGS}
    for r in rows:
        assert r["nfe"] == r["steps"] * (2 if r["sampler"] == "heun" else 1)
        assert r["num_images"] == 16 and 0 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1
        assert r["lpips"] > 0 and "rfid" not in r  # eval.rfid is off in the tiny config
        assert r["seconds_per_image"] > 0  # the second batch, the first one compiled
    # The settings really differ: one step of Euler is not two of Heun.
    assert len({round(r["psnr"], 6) for r in rows}) > 1


def test_rows_equal_mode_eval_at_their_setting(run):
    cfg, workdir, record = run
    row = next(r for r in record["rows"]
               if (r["steps"], r["sampler"], r["spacing"]) == (2, "heun", "reversed_log"))
    eval_cfg = sweep_config()
    eval_cfg.diffusion.update(sample_steps=2, sampler="heun", spacing="reversed_log")
    results = modes.evaluate(eval_cfg, workdir, AutoencoderTask(eval_cfg, "eval"))
    assert results["step"] == STEP
    assert (results["decode_steps"], results["sampler"], results["spacing"]) == (
        2, "heun", "reversed_log")
    for key in ("psnr", "ssim", "lpips"):
        assert results[key] == pytest.approx(row[key], rel=1e-5, abs=1e-6), key


def test_files_json_and_plot(run):
    cfg, workdir, record = run
    assert record["json"] == f"{workdir}/eval/sweep-{STEP}.json"
    assert record["png"] == f"{workdir}/eval/sweep-{STEP}.png"
    saved = json.load(open(record["json"]))
    assert saved["rows"] == record["rows"] and saved["step"] == STEP
    assert "first" in saved["timing"]  # says the compiling batch is left out
    with Image.open(record["png"]) as image:
        image.verify()
    with Image.open(record["png"]) as image:
        assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 200
    # The sweep leaves --mode=eval's reconstruction grid alone.
    assert not (checkpoint.run_directory(workdir) / "images" / f"{STEP}.png").exists()


def test_plot_has_an_rfid_panel_when_rows_have_rfid():
    rows = [{"steps": n, "sampler": s, "spacing": "uniform", "nfe": sweep.nfe(n, s),
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
    assert len(calls) == sweep.nfe(steps, sampler)
