"""A decoder trained on a frozen encoder (init.freeze_encoder, configs/sd_decoder.py): the encoder
never moves and still encodes as diffusers' AutoencoderKL does, the decoder's update is the one
joint training would give it, and latents in SD's scaled convention decode as the raw ones."""

import json

import jax
import numpy as np
import pytest
import torch

from dgae_jax import api, config_lib, optim, parallel, steps, trainer, validation
from dgae_jax.autoencoder import Autoencoder
from dgae_jax.errors import ConfigError
from dgae_jax.steps import build_steps
from dgae_jax.tasks.ae import AutoencoderTask

from fakes import mesh_of
from helpers import config_file, photo_crops, random_diffusers_vae, synthetic_weights

SIZE = 32


def decoder_config(path, freeze=True):
    """A tiny DGAE f8 c=4 at 32 px on a diffusers encoder; constant lr, no clipping (so that the
    frozen and the joint decoder updates are comparable)."""
    cfg = config_lib.autoencoder_config(8, "demo,c=4")
    cfg.image_size, cfg.batch_size = SIZE, 8
    cfg.model.update(dtype="float32", norm_groups=4)
    cfg.model.encoder.update(width=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                             attn_resolutions=())
    cfg.model.unet.update(width=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          head_channels=8)
    cfg.diffusion.sample_steps = 2
    cfg.init.update(encoder_from=str(path), freeze_encoder=freeze)
    cfg.optimizer.update(warmup_steps=0, lr=1e-2, end_lr=1e-2, eps=1e-3, clip_norm=0.0)
    cfg.loss.update(lpips_weight=0.0, kl_weight=1e-2)
    cfg.eval.rfid = False
    return cfg


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusers") / "vae"
    vae = random_diffusers_vae(decoder_config(path))
    vae.save_pretrained(path)
    return path, vae


def started(cfg, mesh, workdir):
    """(task, step functions, model, the state a new run starts from: synthetic weights, then
    the pretrained encoder)."""
    AutoencoderTask.complete_config(cfg, {})
    validation.validate(cfg, "train", workdir=str(workdir), device_count=8)
    task = AutoencoderTask(cfg, "train")
    fns = build_steps(cfg, task, mesh)
    weights = synthetic_weights(jax.eval_shape(task.model.init, jax.random.key(0)))
    task.init_params = lambda model, rng: weights  # the real init compiles for half a minute
    state = steps.make_init(task, optim.make_optimizer(cfg))(task.model, jax.random.key(0))
    state = trainer._start_from(jax.device_put(state, fns.state_shardings),
                                task.pretrained_params())
    return task, fns, jax.device_put(task.model, parallel.replicated(mesh)), state


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_the_frozen_encoder_never_moves_and_the_decoder_learns_as_in_joint_training(
        diffusers_dir, tmp_path):
    path, vae = diffusers_dir
    mesh = mesh_of(2, 4)
    batch = parallel.global_batch({"image": photo_crops(8, SIZE, seed=0, dtype=np.uint8)}, mesh)
    frozen_cfg = decoder_config(path)
    task, fns, model, state = started(frozen_cfg, mesh, tmp_path)
    assert task.frozen == ("encoder",)
    assert frozen_cfg.model.scaling_factor == pytest.approx(0.18215)  # from config.json
    encoder = jax.device_get(state["params"]["encoder"])
    opt_paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]]
    assert not any("encoder" in p for p in opt_paths) and any("decoder" in p for p in opt_paths)

    state, frozen_metrics = fns.train_step(model, state, batch)
    frozen_decoder = jax.device_get(state["params"]["decoder"])
    for _ in range(2):
        state, _ = fns.train_step(model, state, batch)
    assert_same(state["params"]["encoder"], encoder)
    assert_same(state["ema"]["encoder"], encoder)
    assert not np.array_equal(jax.device_get(state["ema"]["decoder"]["conv_in"]["kernel"]),
                              task.init_params(None, None)["decoder"]["conv_in"]["kernel"])

    # Joint training's first step from the same start: the KL term and the encoder's gradient
    # do not reach the decoder, so its decoder update is the frozen run's (the encoder moves).
    _, joint_fns, joint_model, joint = started(decoder_config(path, freeze=False), mesh,
                                                  tmp_path)
    joint, joint_metrics = joint_fns.train_step(joint_model, joint, batch)
    assert not np.array_equal(jax.device_get(joint["params"]["encoder"]["conv_in"]["kernel"]),
                              encoder["conv_in"]["kernel"])
    for got, want in zip(jax.tree.leaves(frozen_decoder),
                         jax.tree.leaves(jax.device_get(joint["params"]["decoder"]))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    kl_term = 1e-2 * float(joint_metrics["kl"]) / (3 * SIZE * SIZE)
    assert float(frozen_metrics["loss"]) == pytest.approx(float(joint_metrics["loss"]) - kl_term,
                                                          rel=1e-5)

    # The frozen encoder still encodes as diffusers does.
    crops = photo_crops(3, SIZE, seed=1)
    ae = Autoencoder.from_config(frozen_cfg, with_lpips=False)
    ours = jax.jit(Autoencoder.encode)(ae, jax.device_get(state["ema"]), crops)
    with torch.no_grad():
        theirs = vae.encode(torch.from_numpy(crops.transpose(0, 3, 1, 2).copy())).latent_dist
    for a, b in ((ours.mean, theirs.mean), (ours.logvar, theirs.logvar)):
        np.testing.assert_allclose(np.asarray(a), b.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_scaled_latents_decode_as_raw_ones(diffusers_dir):
    path, _ = diffusers_dir
    cfg = decoder_config(path)
    AutoencoderTask.complete_config(cfg, {})
    params = synthetic_weights(jax.eval_shape(Autoencoder.from_config(cfg).init,
                                              jax.random.key(0)))
    ae = api.TrainedAutoencoder(cfg, params, batch_size=8)
    assert ae.scaling_factor == pytest.approx(0.18215)
    crops = photo_crops(2, SIZE, seed=2)
    raw, scaled = ae.encode(crops), ae.encode(crops, scaled=True)
    np.testing.assert_array_equal(scaled, raw * np.float32(ae.scaling_factor))
    np.testing.assert_array_equal(ae.decode(scaled, scaled=True, seed=3),
                                  ae.decode(scaled / np.float32(ae.scaling_factor), seed=3))
    cfg.model.scaling_factor = None
    with pytest.raises(ValueError, match="no model.scaling_factor"):
        api.TrainedAutoencoder(cfg, params).decode(raw, scaled=True)


def test_a_frozen_encoder_needs_a_compatible_source(diffusers_dir, tmp_path):
    path, _ = diffusers_dir
    cfg = config_file("sd_decoder.py")("demo")
    assert cfg.init.freeze_encoder and not cfg.init.encoder_from
    with pytest.raises(ConfigError, match=r"^init.freeze_encoder=True needs init.encoder_from"):
        validation.validate(cfg, "train", workdir=str(tmp_path))
    cfg.init.encoder_from = str(path)  # the demo's encoder is 32 wide, the source's 8
    with pytest.raises(ConfigError, match=r"^init.encoder_from: .*block_out_channels"):
        validation.validate(cfg, "train", workdir=str(tmp_path))
    written = json.loads((path / "config.json").read_text())
    assert written["scaling_factor"] == pytest.approx(0.18215)
