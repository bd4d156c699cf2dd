"""`python -m dgae_jax.compare`: seed means and spreads against hand-computed values, the
beyond-the-noise rule, the tagged table, the curves and the stacked images, and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dgae_jax import compare, grids
from dgae_jax.errors import ConfigError


def write_run(path, finals: dict, steps=(10, 20), tag="", grid=None):
    """A run directory with untagged evaluations at `steps` (the last one `finals`), and
    optionally a tagged final evaluation and its image grid."""
    (path / "eval").mkdir(parents=True)
    for step in steps:
        results = {"psnr": 10.0 + step / 10, "ssim": 0.1, "lpips": 0.5, "num_images": 256,
                   "decode_steps": 10, "sampler": "euler", "spacing": "uniform",
                   "bootstrap_std": {"psnr": 0.2, "ssim": 0.01, "lpips": 0.004}}
        if step == steps[-1] and not tag:
            results.update(finals)
        (path / "eval" / f"{step}.json").write_text(json.dumps({"step": step, **results}))
    if tag:
        results = {**results, **finals, "decode_steps": 4}
        (path / "eval" / f"{steps[-1]}-{tag}.json").write_text(json.dumps(results))
    if grid is not None:
        (path / "images").mkdir()
        Image.fromarray(grid).save(path / "images" / f"{steps[-1]}-{tag}.png")
    return str(path)


def test_table_means_spreads_and_the_noise_rule(tmp_path):
    a = [write_run(tmp_path / f"a{i}", {"psnr": p, "lpips": l})
         for i, (p, l) in enumerate([(18.0, 0.30), (18.4, 0.34)])]
    b = [write_run(tmp_path / f"b{i}", {"psnr": p, "lpips": l})
         for i, (p, l) in enumerate([(17.0, 0.31), (17.2, 0.33)])]
    record = compare.final_table(compare.parse_groups([f"A={','.join(a)}", f"B={','.join(b)}"]))
    psnr = record["models"]["A"]["psnr"]
    assert psnr["mean"] == pytest.approx(18.2) and psnr["seeds"] == [18.0, 18.4]
    assert psnr["seed_std"] == pytest.approx(0.4 / np.sqrt(2))  # sample std of two values
    assert psnr["bootstrap_std"] == pytest.approx(0.2)
    assert record["models"]["A"]["step"] == 20 and record["models"]["A"]["decode"] == {
        "decode_steps": 10, "sampler": "euler", "spacing": "uniform"}
    diff = record["difference"]["psnr"]
    assert diff["A - B"] == pytest.approx(1.1)
    assert diff["twice_larger_seed_std"] == pytest.approx(2 * 0.4 / np.sqrt(2))
    assert diff["beyond_noise"] and diff["better"] == "A"  # 1.1 > 0.566
    lpips = record["difference"]["lpips"]  # 0.32 vs 0.32: within the noise
    assert not lpips["beyond_noise"] and lpips["better"] is None
    table = compare.markdown(record)
    assert "| A | 2 | 18.200 ± 0.283 (0.200) |" in table


def test_lower_is_better_for_lpips(tmp_path):
    a = [write_run(tmp_path / f"a{i}", {"lpips": v}) for i, v in enumerate([0.20, 0.21])]
    b = [write_run(tmp_path / f"b{i}", {"lpips": v}) for i, v in enumerate([0.30, 0.31])]
    record = compare.final_table({"A": a, "B": b})
    assert record["difference"]["lpips"]["better"] == "A"


def test_tagged_table_curves_and_stacked_images(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, (4, 8, 8, 3), np.uint8)
    recon = {name: rng.integers(0, 256, (4, 8, 8, 3), np.uint8) for name in "AB"}
    # B ends at another step (as a student after its teacher): each model's own final grid.
    runs = {name: [write_run(tmp_path / f"{name}{i}", {"psnr": 15.0 + i}, tag="final",
                             steps=(10, 20) if name == "A" else (10, 30),
                             grid=grids.image_grid(np.stack([inputs, recon[name]])))
                   for i in range(2)] for name in "AB"}
    args = [f"{name}={','.join(r)}" for name, r in runs.items()]
    out = tmp_path / "figs" / "cmp"
    result = subprocess.run([sys.executable, "-m", "dgae_jax.compare", *args, "--tag=final",
                             "--images=final", f"--out={out}"], capture_output=True, text=True,
                            check=True, timeout=120)
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["models"]["A"]["decode"]["decode_steps"] == 4  # the tagged evaluation's
    assert record["models"]["A"]["psnr"]["mean"] == pytest.approx(15.5)
    with Image.open(record["curves_png"]) as image:
        assert image.size[0] > 600
    stacked = np.asarray(Image.open(record["images_png"]))
    expected = np.concatenate([grids.image_grid(inputs[None]), np.full((2, 38, 3), 255, np.uint8),
                               grids.image_grid(recon["A"][None]),
                               np.full((2, 38, 3), 255, np.uint8),
                               grids.image_grid(recon["B"][None])])
    np.testing.assert_array_equal(stacked, expected)
    assert record["images_rows"] == ["inputs", "A", "B"]


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is not NAME=RUN"):
        compare.parse_groups(["runs/a"])
    with pytest.raises(ConfigError, match="has no evaluation"):
        compare.final_table({"A": [str(tmp_path)]})
    early = write_run(tmp_path / "early", {}, steps=(10,))
    late = write_run(tmp_path / "late", {}, steps=(10, 20))
    with pytest.raises(ConfigError, match="end at different steps"):
        compare.final_table({"A": [early, late]})
    result = subprocess.run([sys.executable, "-m", "dgae_jax.compare", f"A={tmp_path}/none"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "has no evaluation" in result.stderr
