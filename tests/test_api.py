"""The Python API (api.py), --mode=reconstruct and --mode=export, against the model's own
functions, each other, and the CLI's files."""

import json
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import skimage.data
from PIL import Image

from dgae_jax import api, bundle, diffusers_io, diffusion, modes, parallel, validation
from dgae_jax.data import pipeline
from dgae_jax.errors import ConfigError

from helpers import demo_config, save_run

STEP = 5


def run_mode(cfg, mode, workdir):
    """What `python -m dgae_jax.main` runs for a mode, in this process."""
    validation.validate(cfg, mode, workdir=workdir, device_count=jax.device_count())
    return modes.run(cfg, mode, workdir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    cfg = demo_config(**{"diffusion.sample_steps": 2})
    ema = save_run(root / "run", cfg, STEP)["ema"]
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    images = [np.asarray(Image.fromarray(p).resize((32, 32), Image.Resampling.BICUBIC))
              for p in photos]
    return types.SimpleNamespace(cfg=cfg, workdir=str(root / "run"), ema=ema, root=root,
                                 images=np.stack(images), ae=api.load(root / "run"))


def test_load_restores_the_runs_config_and_ema(run):
    ae = run.ae
    assert ae.step == STEP and ae.config.image_size == 32 and ae.latent_shape == (2, 2, 16)
    assert ae.size_multiple == 16  # f16 encoder; the demo U-Net downsamples 8x
    for module in ("encoder", "decoder"):
        for got, want in zip(jax.tree.leaves(ae.params[module]),
                             jax.tree.leaves(run.ema[module])):
            np.testing.assert_array_equal(np.asarray(got), want)


def test_encode_decode_match_the_model_at_any_batching(run):
    ae, x = run.ae, run.images
    signed = x.astype(np.float32) / 127.5 - 1
    params = jax.device_get(ae.params)
    mean = jax.jit(lambda p, x: ae.model.encode(p, x).mean)(params, signed)
    z = ae.encode(x)
    np.testing.assert_allclose(z, mean, atol=1e-5)
    # Image i starts from noise drawn with fold_in(key(seed), i), through the flow sampler.
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.key(3), i), (32, 32, 3))
                       for i in range(3)])
    sampled = jax.jit(lambda p: diffusion.sample(lambda x_t, t: ae.model.velocity(p, x_t, t, z),
                                                 noise, 2, "euler", "uniform"))(params)
    want = np.asarray(jnp.round(jnp.clip((sampled + 1) * 127.5, 0, 255)), np.uint8)
    decoded = ae.decode(z, seed=3)
    assert decoded.dtype == np.uint8 and decoded.shape == (3, 32, 32, 3)
    assert np.abs(decoded.astype(int) - want).max() <= 1  # rounding of float noise
    one_device = api.TrainedAutoencoder(
        ae.config, params, batch_size=1,
        mesh=parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)),
                                jax.local_devices()[:1]))
    assert ae.mesh.size == 8 and one_device.batch_size == 1
    np.testing.assert_array_equal(one_device.decode(z, seed=3), decoded)
    np.testing.assert_array_equal(ae.decode(z[:2], seed=3), decoded[:2])
    np.testing.assert_array_equal(ae.reconstruct(x, seed=3), ae.decode(ae.encode(x), seed=3))
    assert not np.array_equal(ae.decode(z, seed=4), decoded)
    drawn = ae.encode(x, sample=True, seed=1)
    assert drawn.shape == z.shape and not np.allclose(drawn, z)


def test_inputs_of_every_kind_and_size(run):
    ae, x = run.ae, run.images
    want = ae.encode(x)
    np.testing.assert_array_equal(ae.encode([Image.fromarray(i) for i in x]), want)
    np.testing.assert_allclose(ae.encode(x.astype(np.float32) / 127.5 - 1), want, atol=1e-6)
    np.testing.assert_array_equal(ae.encode(x[0]), want[:1])
    tall = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((32, 64)))
    odd = skimage.data.coffee()[:20, :30]  # not multiples of 16: padded and cropped back
    out = ae.reconstruct([x[0], tall, odd])  # tall is above the training size: tiled
    assert [o.shape for o in out] == [(32, 32, 3), (64, 32, 3), (20, 30, 3)]
    assert ae.encode(tall).shape == (1, 4, 2, 16)
    with pytest.raises(ValueError, match=r"float images must lie in \[-1, 1\]"):
        ae.encode(x.astype(np.float32))
    with pytest.raises(ValueError, match="expected latents"):
        ae.decode(np.zeros((1, 2, 2, 4), np.float32))


def test_load_errors_name_the_path(run, tmp_path):
    with pytest.raises(ConfigError, match="neither a run's workdir"):
        api.load(tmp_path)
    with pytest.raises(ConfigError, match="step=3: .* has no checkpoint of that step"):
        api.load(run.workdir, step=3)


def test_reconstruct_mode_writes_what_the_api_gives(run, tmp_path):
    inputs = tmp_path / "in"
    (inputs / "more").mkdir(parents=True)
    Image.fromarray(run.images[0]).save(inputs / "astronaut.png")
    Image.fromarray(run.images[1]).save(inputs / "more" / "coffee.jpg", quality=95)
    cat = Image.fromarray(skimage.data.chelsea()).resize((60, 45))  # not 16s, tiled
    cat.save(inputs / "cat.png")
    cfg = demo_config(**{"diffusion.sample_steps": 2})
    cfg.reconstruct.update(input=str(inputs), output=str(tmp_path / "out"), seed=2)
    record = run_mode(cfg, "reconstruct", run.workdir)
    out = tmp_path / "out"
    names = ["astronaut.png", "cat.png", "more/coffee.png"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == sorted(
        names + ["comparison.png"])
    files = [np.asarray(Image.open(inputs / n)) for n in ("astronaut.png", "cat.png",
                                                         "more/coffee.jpg")]
    expected = run.ae.reconstruct(files, seed=2)
    for name, want in zip(names, expected):
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), want)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["name"] for m in metrics["images"]] == ["astronaut.png", "cat.png",
                                                      "more/coffee.jpg"]
    assert metrics["step"] == STEP and metrics["decode_steps"] == 2 and metrics["seed"] == 2
    psnr = [m["psnr"] for m in metrics["images"]]
    assert record["mean"]["psnr"] == pytest.approx(np.mean(psnr))
    mse = np.mean((files[0].astype(float) - expected[0]) ** 2)
    assert psnr[0] == pytest.approx(10 * np.log10(255**2 / mse), rel=1e-5)
    assert all(m["lpips"] > 0 for m in metrics["images"])
    grid = np.asarray(Image.open(out / "comparison.png"))
    assert grid.shape == (2 * 32 + 2, 3 * 32 + 2 * 2, 3)
    np.testing.assert_array_equal(grid[34:, :32], expected[0])  # reconstruction under input


@pytest.mark.slow
def test_export_round_trip(run, tmp_path):
    cfg = demo_config(**{"diffusion.sample_steps": 2})
    cfg.export.dir = str(tmp_path / "bundle")
    record = run_mode(cfg, "export", run.workdir)
    assert record["step"] == STEP and record["format"] == "dgae"
    assert sorted(os.listdir(cfg.export.dir)) == ["README.md", "config.json", "model.safetensors",
                                                  "model_card.json"]
    card = json.loads((tmp_path / "bundle" / "model_card.json").read_text())
    assert card["latent_shape"] == [2, 2, 16] and card["latent_statistics"]["num_images"] == 32
    eval_images = [b["image"][b["mask"]] for b in pipeline.eval_dataset(cfg)]
    z = run.ae.encode(np.concatenate(eval_images))
    assert card["latent_statistics"]["std"] == pytest.approx(float(np.std(z)), rel=1e-4)
    assert len(card["latent_statistics"]["channel_mean"]) == 16
    exported = api.load(cfg.export.dir)
    assert exported.step == STEP
    np.testing.assert_array_equal(exported.reconstruct(run.images, seed=1),
                                  run.ae.reconstruct(run.images, seed=1))
    with pytest.raises(ConfigError, match="export.dir=.* already exists"):
        run_mode(cfg, "export", run.workdir)
    keys = bundle.flatten(jax.device_get(exported.params))
    assert "encoder/quant_conv/kernel" in keys and not any(k.startswith("disc") for k in keys)


@pytest.mark.slow
def test_the_conv_baseline_exports_as_a_diffusers_autoencoder(tmp_path):
    cfg = demo_config(**{"model.decoder": "conv"})
    ema = save_run(tmp_path / "run", cfg, STEP)["ema"]
    cfg.export.update(dir=str(tmp_path / "vae"), format="diffusers")
    record = run_mode(cfg, "export", str(tmp_path / "run"))
    assert record["format"] == "diffusers" and record["step"] == STEP
    loaded = diffusers_io.load_params(cfg.export.dir, cfg, ("encoder", "decoder"))
    for module in ("encoder", "decoder"):
        for got, want in zip(jax.tree.leaves(loaded[module]), jax.tree.leaves(ema[module])):
            np.testing.assert_array_equal(got, want)
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["scaling_factor"] == pytest.approx(1 / record["latent_std"])
    card = json.loads((tmp_path / "vae" / "model_card.json").read_text())
    assert card["decoder"] == "conv" and "AutoencoderKL" in (tmp_path / "vae" / "README.md"
                                                             ).read_text()
    cfg.model.scaling_factor = 0.18215  # a decoder trained on SD's frozen encoder keeps SD's
    cfg.export.dir = str(tmp_path / "sd")
    run_mode(cfg, "export", str(tmp_path / "run"))
    assert json.loads((tmp_path / "sd" / "config.json").read_text())["scaling_factor"] == 0.18215
    cfg.model.decoder = "diffusion"
    cfg.export.dir = str(tmp_path / "other")
    with pytest.raises(ConfigError, match="export.format='diffusers' needs model.decoder='conv'"):
        validation.validate(cfg, "export", workdir=str(tmp_path / "run"))
