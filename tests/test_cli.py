"""End to end through `python -m dgae_jax.main` in subprocesses, as a user runs it."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def demo(total_steps=4, eval_every=4, config="configs/demo.py"):
    """The README demo's command, shortened; the DiT pipeline runs on the f16 demo's latents."""
    return [f"--config={config}", f"--config.total_steps={total_steps}",
            "--config.log_every=2", f"--config.eval_every={eval_every}",
            "--config.checkpoint_every=2", "--config.batch_size=4", "--config.data.eval_size=8",
            "--config.diffusion.sample_steps=2"]


def main(*args, check=True):
    return subprocess.run([sys.executable, "-m", "dgae_jax.main", *args], capture_output=True,
                          text=True, check=check, timeout=900)


@pytest.mark.slow
def test_demo_trains_and_evaluates(tmp_path, inception_weights):
    workdir = str(tmp_path / "run")
    out = main(*demo(), f"--workdir={workdir}",
               f"--config.eval.inception_weights={inception_weights}")
    start = out.stderr.split("train step compiled")[0]  # what a user reads before the first step
    assert "parameters: decoder 0.83M, encoder 1.49M; 2.32M in all" in start
    assert f"writing {workdir}" in start and "mesh data 1 x fsdp 1" in start
    assert not any(noise in start for noise in ("oneDNN", "InitializeLog", "| Name", "libtpu"))
    assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["2", "4"]
    results = json.load(open(f"{workdir}/eval/4.json"))
    assert results["num_images"] == 8 and results["step"] == 4
    assert 0 < results["psnr"] < 60 and -1 <= results["ssim"] <= 1 and results["lpips"] > 0
    assert results["rfid"] > 0 and results["decode_steps"] == 2
    grid = np.asarray(Image.open(f"{workdir}/images/4.png"))
    assert grid.shape == (2 * 64 + 2, 8 * 64 + 7 * 2, 3)  # inputs over reconstructions
    assert glob.glob(f"{workdir}/events.out.tfevents.*")  # TensorBoard

    out = main(*demo(), f"--workdir={workdir}", "--mode=eval",
               f"--config.eval.inception_weights={inception_weights}")
    again = json.loads(out.stdout.strip().splitlines()[-1])
    assert again["step"] == 4 and again["psnr"] == pytest.approx(results["psnr"], rel=1e-5)
    assert again["rfid"] == pytest.approx(results["rfid"], rel=1e-4)
    # Resuming through the CLI is tested as a 2-process job in test_multiprocess.py.


@pytest.mark.parametrize("overrides,message", [
    (["--config.image_size=100"], "image_size=100 is not divisible by the spatial factor 16"),
    (["--config.total_step=2"], "no field 'total_step' in the config (Did you mean"),
])
def test_bad_config_is_one_line(tmp_path, overrides, message):
    """A field that validation refuses, and one that the config does not have (refused while
    absl parses the flags): one line, no traceback. Every other refusal is in test_validation."""
    out = main("--config=configs/f16.py:demo", f"--workdir={tmp_path}", *overrides, check=False)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("config error:") and message in last, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_autoencoder_cache_ldm_and_samples_end_to_end(tmp_path, inception_weights):
    """demo autoencoder (2 steps) -> latent cache -> demo DiT (2 steps, with gFID) -> samples."""
    from dgae_jax import fid
    from dgae_jax.data import sources
    ae, cache, ldm = (str(tmp_path / d) for d in ("ae", "cache", "ldm"))
    f16 = "configs/f16.py:demo"
    main(*demo(total_steps=2, eval_every=100, config=f16), f"--workdir={ae}",
         "--config.eval.rfid=False")
    out = main(*demo(config=f16), f"--workdir={ae}", "--mode=cache_latents",
               f"--config.cache.dir={cache}")
    cached = json.loads(out.stdout.strip().splitlines()[-1])
    assert cached["latent_shape"] == [4, 4, 16]
    assert cached["examples"] == {"train": 15 * 32, "eval": 8 * 4}  # 32 crops of each photo

    reference = tmp_path / "reference.npz"
    crops = sources.FixedCrops(sources.EmbeddedPhotos("eval"), 64)
    np.savez(tmp_path / "ref_images.npz", np.stack([crops[i]["image"] for i in range(8)]))
    fid.evaluate(str(tmp_path / "ref_images.npz"), save_stats=str(reference), batch_size=8,
                 weights=inception_weights)
    ldm_args = ["--config=configs/ldm_f16.py:demo", f"--workdir={ldm}",
                f"--config.cache.dir={cache}", "--config.total_steps=2", "--config.log_every=1",
                "--config.eval_every=2", "--config.checkpoint_every=2", "--config.batch_size=8",
                "--config.eval.num_images=4", "--config.eval.fid_samples=8",
                f"--config.eval.fid_reference={reference}",
                f"--config.eval.inception_weights={inception_weights}",
                "--config.diffusion.sample_steps=2"]
    main(*ldm_args)
    results = json.load(open(f"{ldm}/eval/2.json"))
    assert results["fid_samples"] == 8 and results["gfid"] > 0
    assert np.asarray(Image.open(f"{ldm}/samples/2/grid.png")).shape == (64, 4 * 64 + 3 * 2, 3)

    out = main(*ldm_args, "--mode=sample", "--config.sample.num=6",
               "--config.sample.classes=(3, 5)")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["step"] == 2 and record["num"] == 6
    with np.load(f"{ldm}/samples/2/images.npz") as saved:
        assert saved["arr_0"].shape == (6, 64, 64, 3) and saved["arr_0"].dtype == np.uint8
        assert saved["labels"].tolist() == [3, 5, 3, 5, 3, 5]
    assert os.path.exists(f"{ldm}/samples/2/grid.png")
