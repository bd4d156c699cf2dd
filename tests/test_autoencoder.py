"""The autoencoder's loss against hand calculations, and training on one batch."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import scipy.integrate
import scipy.stats

from dgae_jax import diffusion
from dgae_jax.autoencoder import Autoencoder, Posterior
from dgae_jax.errors import LPIPSWeightsError
from dgae_jax.metrics import lpips

from helpers import photo_crops

grad_fn = jax.jit(jax.value_and_grad(Autoencoder.loss_fn, argnums=1, has_aux=True))


def test_kl_matches_numerical_integration():
    mean = np.array([0.0, 1.3, -0.4, 2.0], np.float32)
    logvar = np.array([0.0, -1.0, 0.7, -3.0], np.float32)
    post = Posterior(jnp.asarray(mean)[None], jnp.asarray(logvar)[None])
    expected = 0.0
    for m, lv in zip(mean, logvar):
        q = scipy.stats.norm(m, np.exp(0.5 * lv))
        p = scipy.stats.norm(0.0, 1.0)
        expected += scipy.integrate.quad(lambda z: q.pdf(z) * (q.logpdf(z) - p.logpdf(z)),
                                         -30, 30, limit=200)[0]
    np.testing.assert_allclose(post.kl(), [expected], rtol=1e-5)


def test_posterior_clips_logvar_and_samples_with_its_moments():
    moments = jnp.concatenate([jnp.full((1, 64, 64, 1), 0.5), jnp.full((1, 64, 64, 1), 50.0)], -1)
    assert float(Posterior.from_moments(moments).logvar.max()) == 20.0
    post = Posterior(jnp.full((1, 200, 200, 1), 0.5), jnp.full((1, 200, 200, 1), np.log(0.09)))
    z = np.asarray(post.sample(jax.random.key(0)))
    assert abs(z.mean() - 0.5) < 0.01 and abs(z.std() - 0.3) < 0.01


def test_diffusion_loss_by_hand(tiny_config):
    """ADM zero-initialises the U-Net output, so at init v_hat = 0 and every term is known."""
    cfg = tiny_config(8)
    cfg.loss.update(velocity_weight=2.0, kl_weight=1e-3, lpips_weight=0.5)
    ae = Autoencoder.from_config(cfg)
    params = ae.init(jax.random.key(0))
    x = jnp.asarray(photo_crops(4, 32, seed=0))
    rng = jax.random.key(7)
    loss, m = jax.jit(Autoencoder.loss_fn)(ae, params, {"image": x}, rng)

    _, rng_t, rng_eps = jax.random.split(rng, 3)
    t = diffusion.sample_time(rng_t, 4)
    eps = jax.random.normal(rng_eps, x.shape)
    x_t = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * eps
    velocity_mse = np.mean((np.asarray(eps) - np.asarray(x)) ** 2)
    post = jax.jit(ae.encode)(params, x)
    mean, logvar = np.asarray(post.mean), np.asarray(post.logvar)
    kl = np.mean(0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3)))
    lp = np.mean(jax.jit(lpips.lpips_distance, static_argnames="net")(
        ae.lpips_weights, x_t, x, net="alexnet"))
    np.testing.assert_allclose(m["velocity_mse"], velocity_mse, rtol=1e-5)
    np.testing.assert_allclose(m["x0_mse"], np.mean((np.asarray(x_t) - np.asarray(x)) ** 2),
                               rtol=1e-5)
    np.testing.assert_allclose(m["kl"], kl, rtol=1e-4)
    np.testing.assert_allclose(m["lpips"], lp, rtol=1e-4)
    # The KL sum is weighed against reconstruction terms summed over the 3*H*W values (SD-VAE).
    np.testing.assert_allclose(loss, 2.0 * velocity_mse + 1e-3 * kl / (3 * 32 * 32) + 0.5 * lp,
                               rtol=1e-5)


def overfit(ae, x, steps, lr):
    """Adam on one batch; returns per-step metrics and final params."""
    params = jax.jit(ae.init)(jax.random.key(0))
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(ae, params, opt, rng):
        (_, m), g = jax.value_and_grad(Autoencoder.loss_fn, argnums=1, has_aux=True)(
            ae, params, {"image": x}, rng)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, m

    history = []
    for i in range(steps):
        params, opt, m = step(ae, params, opt, jax.random.key(i))
        history.append(jax.device_get(m))
    return params, history


@pytest.mark.slow
@pytest.mark.parametrize("decoder,steps", [("diffusion", 150), ("conv", 80)])
def test_overfits_one_batch(tiny_config, decoder, steps):
    ae = Autoencoder.from_config(tiny_config(8, decoder))
    x = jnp.asarray(photo_crops(4, 32, seed=0))
    reconstruct = jax.jit(Autoencoder.reconstruct, static_argnames="steps")

    def recon_mse(params, z=None):
        if z is not None:
            out = ae.decode(params, z, jax.random.key(99), steps=10)
        else:
            out = reconstruct(ae, params, x, jax.random.key(99), steps=10)
        return float(jnp.mean((out - x) ** 2))

    before = recon_mse(jax.jit(ae.init)(jax.random.key(0)))
    params, history = overfit(ae, x, steps, 2e-3)
    loss = np.array([h["loss"] for h in history])
    windows = loss.reshape(5, -1).mean(axis=1)
    assert np.all(np.diff(windows) < 0), windows  # falls steadily
    assert windows[-1] < 0.4 * windows[0], windows
    after = recon_mse(params)
    zero_latent = recon_mse(params, jnp.zeros((4,) + ae.latent_shape))
    assert after < 0.3 * before, (before, after)
    assert after < 0.7 * zero_latent, (after, zero_latent)


@pytest.mark.slow
def test_gan_adaptive_weight_and_gating(tiny_config):
    """The adaptive weight equals |d rec / dW| / |d gan / dW| at the decoder's last kernel,
    computed here by differentiating the whole loss w.r.t. the parameter tree instead."""
    cfg = tiny_config(8, "conv", gan=0.5)
    cfg.loss.gan_start = 5
    ae = Autoencoder.from_config(cfg)
    params = ae.init(jax.random.key(0))
    # A steeper discriminator keeps the weight below SD-VAE's clamp (1e4), so the ratio shows.
    params["discriminator"]["conv_out"]["kernel"] *= 20.0
    x = jnp.asarray(photo_crops(4, 32, seed=0))
    rng = jax.random.key(1)
    z = jax.jit(ae.encode)(params, x).sample(jax.random.split(rng, 3)[0])

    def decoded(p):
        return ae._module(p, "decoder")(z)

    def rec(p):
        img = decoded(p)
        return (jnp.mean(jnp.abs(img - x))
                + jnp.mean(lpips.lpips_distance(ae.lpips_weights, img, x, net="alexnet")))

    def gan(p):
        return -jnp.mean(ae._module(p, "discriminator")(decoded(p)))

    n = 3 * 32 * 32
    g_rec = jax.jit(jax.grad(rec))(params)["decoder"]["conv_out"]["kernel"]
    g_gan = jax.jit(jax.grad(gan))(params)["decoder"]["conv_out"]["kernel"]
    expected = 0.5 * n * np.linalg.norm(g_rec) / (np.linalg.norm(g_gan) + 1e-4)
    assert expected < 0.5 * 1e4

    (loss_on, m_on), grads = grad_fn(ae, params, {"image": x}, rng, 5)
    np.testing.assert_allclose(m_on["gan_weight"], expected, rtol=1e-4)
    assert m_on["gan_on"] == 1.0
    assert np.linalg.norm(jax.tree.leaves(grads["discriminator"])[0]) > 0
    # Before gan_start neither the generator nor the discriminator feels the GAN.
    (loss_off, m_off), grads = grad_fn(ae, params, {"image": x}, rng, 4)
    assert m_off["gan_on"] == 0.0
    rec_only = m_off["l1"] + m_off["lpips"] + cfg.loss.kl_weight * m_off["kl"] / n
    np.testing.assert_allclose(loss_off, rec_only, rtol=1e-6)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["discriminator"]))
    np.testing.assert_allclose(
        loss_on, rec_only + m_on["gan_weight"] * m_on["g_loss"] / n + m_on["d_loss"], rtol=1e-5)

    # CompVis LPIPSWithDiscriminator's generator loss, written as it is there: L1 + LPIPS summed
    # over each image's values (batch mean), + kl_weight x KL sum, + the adaptive weight of the
    # summed terms' gradients x the GAN loss. Ours is exactly it divided by 3*H*W.
    def compvis_nll(p):
        img = decoded(p)
        per_value = jnp.abs(img - x) + lpips.lpips_distance(
            ae.lpips_weights, img, x, net="alexnet")[:, None, None, None]
        return jnp.sum(per_value) / x.shape[0]

    g_nll = jax.jit(jax.grad(compvis_nll))(params)["decoder"]["conv_out"]["kernel"]
    d_weight = 0.5 * np.clip(np.linalg.norm(g_nll) / (np.linalg.norm(g_gan) + 1e-4), 0, 1e4)
    posterior = jax.jit(ae.encode)(params, x)
    compvis = (compvis_nll(params) + cfg.loss.kl_weight * np.mean(posterior.kl())
               + d_weight * gan(params))
    np.testing.assert_allclose(loss_on - m_on["d_loss"], compvis / n, rtol=1e-4)


def test_decode_is_deterministic_given_rng(tiny_config):
    ae = Autoencoder(ml_collections.FrozenConfigDict(tiny_config(8)))
    params = ae.init(jax.random.key(0))
    # Give the U-Net a non-zero output layer so the samples depend on the noise.
    params["decoder"]["conv_out"]["kernel"] = 0.1 * jax.random.normal(
        jax.random.key(5), params["decoder"]["conv_out"]["kernel"].shape)
    z = jax.random.normal(jax.random.key(1), (2,) + ae.latent_shape)
    decode = jax.jit(Autoencoder.decode, static_argnames=("steps", "sampler", "spacing"))
    for sampler, spacing, steps in [("euler", "uniform", 1), ("heun", "reversed_log", 3)]:
        a = decode(ae, params, z, jax.random.key(2), steps, sampler, spacing)
        b = decode(ae, params, z, jax.random.key(2), steps, sampler, spacing)
        c = decode(ae, params, z, jax.random.key(3), steps, sampler, spacing)
        np.testing.assert_array_equal(a, b)
        assert float(jnp.abs(a - c).max()) > 1e-3


def test_missing_lpips_weights_fail_loudly(tiny_config, monkeypatch):
    monkeypatch.setattr(lpips, "_weights_file", lambda net: lpips.Path("/nonexistent/x.ckpt"))
    with pytest.raises(LPIPSWeightsError, match="/nonexistent/x.ckpt"):
        Autoencoder.from_config(tiny_config(8))
    cfg = tiny_config(8)
    cfg.loss.lpips_weight = 0.0  # without the term no weights are needed
    assert Autoencoder.from_config(cfg).lpips_weights is None
