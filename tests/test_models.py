"""Shapes and parameter counts of the encoder, U-Net, conv decoder and discriminator."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dgae_jax import config_lib
from dgae_jax.autoencoder import Autoencoder
from dgae_jax.models.layers import timestep_embedding
from dgae_jax.modes.summary import count_by_module

from helpers import photo_crops


def abstract_counts(config):
    """Module totals of a config, from shapes only (nothing is allocated)."""
    ae = Autoencoder(ml_collections.FrozenConfigDict(config))
    return count_by_module(jax.eval_shape(ae.init, jax.random.key(0)), depth=1)


@pytest.mark.parametrize("factor", [8, 16, 32])
@pytest.mark.parametrize("c", [3, 8])
@pytest.mark.parametrize("decoder", ["diffusion", "conv"])
def test_shapes(tiny_config, factor, c, decoder):
    cfg = tiny_config(factor, decoder, size=64 if factor == 32 else 32, c=c)
    ae = Autoencoder(ml_collections.FrozenConfigDict(cfg))
    params = jax.eval_shape(ae.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, cfg.image_size, cfg.image_size, 3), jnp.float32)
    post = jax.eval_shape(ae.encode, params, x)
    side = cfg.image_size // factor
    assert post.mean.shape == post.logvar.shape == (2, side, side, c)
    assert ae.latent_shape == (side, side, c)
    out = jax.eval_shape(lambda p, x: ae.reconstruct(p, x, jax.random.key(0), steps=2), params, x)
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_forward_runs_in_bfloat16(tiny_config):
    cfg = tiny_config(16, size=32, c=4)
    x = jnp.asarray(photo_crops(2, 32, seed=0))
    outs = {}
    for dtype in ("float32", "bfloat16"):
        cfg.model.dtype = dtype
        ae = Autoencoder(ml_collections.FrozenConfigDict(cfg))
        params = ae.init(jax.random.key(0))
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
        outs[dtype] = np.asarray(jax.jit(ae.encode)(params, x).mean)
    np.testing.assert_allclose(outs["bfloat16"], outs["float32"], atol=0.05)


@pytest.mark.parametrize("size,paper", [("B", 122e6), ("M", 276e6), ("L", 491e6)])
def test_decoder_parameter_counts_match_the_paper(size, paper):
    counts = abstract_counts(config_lib.autoencoder_config(16, f"size={size}"))
    assert abs(counts["decoder"] / paper - 1) < 0.03, counts["decoder"]


def test_encoder_is_sd_vae_size():
    """Paper: 157M total - 122M decoder = ~35M encoder, the SD-VAE encoder."""
    counts = abstract_counts(config_lib.autoencoder_config(8))
    assert abs(counts["encoder"] / 35e6 - 1) < 0.03, counts["encoder"]


def test_sd_vae_baseline_matches_compvis_kl_f8_exactly():
    """CompVis AutoencoderKL kl-f8 has 83,653,863 parameters (34,163,664 of them in the encoder
    with quant_conv), and taming's NLayerDiscriminator(ndf=64, n_layers=3) has 2,765,633."""
    counts = abstract_counts(config_lib.autoencoder_config(8, "decoder=conv"))
    assert counts["encoder"] + counts["decoder"] == 83_653_863
    assert counts["encoder"] == 34_163_664
    assert counts["discriminator"] == 2_765_633


def test_unet_adapts_to_resolution():
    for res in (64, 128):
        cfg = config_lib.autoencoder_config(16, f"res={res}")
        ae = Autoencoder(ml_collections.FrozenConfigDict(cfg))
        params = jax.eval_shape(ae.init, jax.random.key(0))
        x = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
        z = jax.ShapeDtypeStruct((1,) + ae.latent_shape, jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.float32)
        assert jax.eval_shape(ae.velocity, params, x, t, z).shape == x.shape
        levels = len(params["decoder"]["down"])
        assert levels == {64: 4, 128: 5}[res]  # ADM's channel_mult table


def test_timestep_embedding_formula():
    t = jnp.array([0.0, 3.0, 999.0])
    emb = np.asarray(timestep_embedding(t, 8))
    freqs = np.exp(-np.log(10_000.0) * np.arange(4) / 4)
    expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], -1)
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)


def test_remat_and_attention_choices_leave_the_velocity_and_gradients_unchanged(tiny_config):
    """Rematerialising every block and attention recomputes the same values; 'xla' attention is
    what JAX picks on a CPU."""
    cfg = tiny_config(8, size=16, c=4)
    shapes = jax.eval_shape(Autoencoder(ml_collections.FrozenConfigDict(cfg)).init,
                            jax.random.key(0))
    rng = np.random.default_rng(0)  # random everywhere, zero-initialised output layers included
    params = jax.tree.map(lambda p: np.float32(0.2) * rng.standard_normal(p.shape, np.float32),
                          shapes)
    x_t, z = rng.standard_normal((2, 16, 16, 3)), rng.standard_normal((2, 2, 2, 4))
    t = np.array([0.3, 0.8])
    results = {}
    for remat, attention in (("none", None), ("blocks", "xla")):
        cfg.model.unet.update(remat=remat, attention=attention)
        ae = Autoencoder(ml_collections.FrozenConfigDict(cfg))
        results[remat] = jax.jit(jax.value_and_grad(
            lambda p: jnp.sum(ae.velocity(p, x_t, t, z) ** 2)))(params)
    (loss, grads), (want_loss, want_grads) = results["blocks"], results["none"]
    assert want_loss > 0
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads, want_grads)
    assert np.abs(want_grads["decoder"]["conv_in"]["kernel"]).max() > 0
