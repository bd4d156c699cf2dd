"""The latent DiT: shapes, adaLN-Zero start, guidance, the loss by hand, parameter counts, and
overfitting a handful of latents."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgae_jax import config_lib, diffusion
from dgae_jax.ldm import LatentDiffusion


def tiny_config(patch=1, size=8, channels=4, classes=4):
    cfg = config_lib.ldm_config("demo")
    cfg.model.update(hidden=32, depth=2, heads=2, patch_size=patch, latent_size=size,
                     latent_channels=channels, num_classes=classes)
    return cfg


def perturbed(params, rng, scale=0.05):
    """Parameters with the zero-initialised (adaLN-Zero) weights made non-zero."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(rng, len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("patch", [1, 2])
def test_shapes_and_adaln_zero_start(patch):
    ldm = LatentDiffusion.from_config(tiny_config(patch))
    params = jax.jit(ldm.init)(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
    t, labels = jnp.array([0.1, 0.5, 0.9]), jnp.array([0, 3, 4])  # 4 is the null class
    velocity = jax.jit(ldm.velocity)
    v = velocity(params, x, t, labels)
    assert v.shape == x.shape and v.dtype == jnp.float32
    assert jnp.all(v == 0)  # every block and the final layer start at zero
    v = velocity(perturbed(params, jax.random.key(2)), x, t, labels)
    assert jnp.all(jnp.isfinite(v)) and jnp.std(v) > 0


def test_guidance_scale_one_is_the_conditional_prediction():
    ldm = LatentDiffusion.from_config(tiny_config())
    params = perturbed(jax.jit(ldm.init)(jax.random.key(0)), jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
    t, labels = jnp.array([0.3, 0.7]), jnp.array([1, 2])
    velocity = jax.jit(ldm.velocity)
    guided = jax.jit(ldm.guided_velocity, static_argnums=4)
    cond = velocity(params, x, t, labels)
    null = velocity(params, x, t, jnp.full((2,), 4))
    np.testing.assert_allclose(guided(params, x, t, labels, 1.0), cond, atol=1e-6)
    np.testing.assert_allclose(guided(params, x, t, labels, 3.0), null + 3.0 * (cond - null),
                               rtol=1e-5, atol=1e-5)


def test_loss_by_hand_at_initialisation():
    """At init v_hat = 0, so the loss is mean((eps - x)^2) with the loss's own rng split."""
    ldm = LatentDiffusion.from_config(tiny_config())
    params = jax.jit(ldm.init)(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))
    rng = jax.random.key(2)
    loss, metrics = jax.jit(ldm.loss_fn)(params, {"latent": x, "label": jnp.arange(4)}, rng)
    eps = jax.random.normal(jax.random.split(rng, 3)[2], x.shape)
    np.testing.assert_allclose(loss, jnp.mean((eps - x) ** 2), rtol=1e-6)
    assert metrics["velocity_mse"] == loss


def test_labels_are_dropped_at_the_configured_rate():
    cfg = tiny_config(size=2)
    cfg.model.label_dropout = 0.25
    ldm = LatentDiffusion.from_config(cfg)
    params = jax.jit(ldm.init)(jax.random.key(0))
    batch = {"latent": jnp.zeros((2048, 2, 2, 4)), "label": jnp.zeros(2048, jnp.int32)}
    _, metrics = jax.jit(ldm.loss_fn)(params, batch, jax.random.key(3))
    assert abs(float(metrics["labels_dropped"]) - 0.25) < 0.03


def test_dit_xl_parameter_counts():
    """DiT-XL/2 on 32x32x4 latents with DiT's learned-sigma head and pos-embedding parameter is
    675,129,632 (the DiT paper's count); ours has neither (velocity only, fixed positions)."""
    for arg, shape, expected in [("", (16, 16, 16), 674_816_272),
                                 ("c=8", (16, 16, 8), 674_797_832)]:
        ldm = LatentDiffusion.from_config(config_lib.ldm_config(arg))
        params = jax.eval_shape(ldm.init, jax.random.key(0))
        assert ldm.latent_shape == shape
        assert sum(p.size for p in jax.tree.leaves(params)) == expected
    learned_sigma_head, pos_embed = 1152 * 16 + 16, 256 * 1152
    assert 674_816_272 + learned_sigma_head + pos_embed == 675_129_632


def test_tiny_dit_overfits_a_handful_of_latents():
    """Four classes, one latent each: after training, sampling a class returns its latent."""
    cfg = tiny_config(size=4, channels=4, classes=4)
    cfg.model.update(hidden=64, depth=2, heads=4, label_dropout=0.0)
    cfg.diffusion.time_sampling = "uniform"
    ldm = LatentDiffusion.from_config(cfg)
    targets = jax.random.normal(jax.random.key(0), (4, 4, 4, 4))
    params = jax.jit(ldm.init)(jax.random.key(1))
    tx = optax.adam(2e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, rng):
        labels = jnp.arange(32) % 4
        batch = {"latent": targets[labels], "label": labels}
        (loss, _), grads = jax.value_and_grad(ldm.loss_fn, has_aux=True)(params, batch, rng)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for i in range(600):
        params, opt, loss = step(params, opt, jax.random.key(100 + i))
        losses.append(float(loss))
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])
    samples = jax.jit(lambda p, r: ldm.sample(p, jnp.arange(8) % 4, r, steps=50,
                                              sampler="euler"))(params, jax.random.key(7))
    distances = jnp.linalg.norm((samples[:, None] - targets[None]).reshape(8, 4, -1), axis=-1)
    assert jnp.all(jnp.argmin(distances, axis=1) == jnp.arange(8) % 4)
    # Closer to its own latent than the latents are to each other.
    own = distances[jnp.arange(8), jnp.arange(8) % 4]
    gaps = jnp.sqrt(jnp.sum((targets[:, None] - targets[None]) ** 2, axis=(2, 3, 4)))
    apart = jnp.min(gaps + 1e9 * jnp.eye(4))
    assert jnp.max(own) < 0.5 * apart, (own, apart)


def test_sampler_uses_the_shared_flow_integrator():
    """With guidance 1 the sampler is diffusion.sample over the conditional velocity."""
    ldm = LatentDiffusion.from_config(tiny_config())
    params = perturbed(jax.jit(ldm.init)(jax.random.key(0)), jax.random.key(1))
    labels, rng = jnp.array([0, 1]), jax.random.key(5)
    got = jax.jit(lambda p: ldm.sample(p, labels, rng, steps=3, sampler="heun"))(params)
    noise = jax.random.normal(rng, (2, 8, 8, 4))
    want = jax.jit(lambda p: diffusion.sample(lambda x, t: ldm.velocity(p, x, t, labels), noise,
                                              3, "heun"))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
