"""The latent DiT: shapes, adaLN-Zero start, one guidance path for both objectives, the losses by
hand, parameter counts, and overfitting a handful of latents."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgae_jax import config_lib, ddpm, diffusion
from dgae_jax.ldm import LatentDiffusion


def tiny_config(patch=1, size=8, channels=4, classes=4, objective="rf"):
    cfg = config_lib.ldm_config(f"demo,objective={objective}")
    cfg.model.update(hidden=32, depth=2, heads=2, patch_size=patch, latent_size=size,
                     latent_channels=channels, num_classes=classes)
    return cfg


def perturbed(params, rng, scale=0.05):
    """Parameters with the zero-initialised (adaLN-Zero) weights made non-zero."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(rng, len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("patch,objective,out", [(1, "rf", 4), (2, "rf", 4), (2, "ddpm", 8)])
def test_shapes_and_adaln_zero_start(patch, objective, out):
    ldm = LatentDiffusion.from_config(tiny_config(patch, objective=objective))
    params = jax.jit(ldm.init)(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
    t, labels = jnp.array([0.1, 0.5, 0.9]), jnp.array([0, 3, 4])  # 4 is the null class
    output = jax.jit(ldm.output)
    v = output(params, x, t, labels)
    assert v.shape == (3, 8, 8, out) and v.dtype == jnp.float32
    assert jnp.all(v == 0)  # every block and the final layer start at zero
    v = output(perturbed(params, jax.random.key(2)), x, t, labels)
    assert jnp.all(jnp.isfinite(v)) and jnp.std(v) > 0


@pytest.mark.parametrize("objective", ["rf", "ddpm"])
def test_one_guidance_path_for_both_objectives(objective):
    """null + s (cond - null) on the predicted channels; DDPM's learned variance is the
    conditional one; scale 1 is the conditional output."""
    ldm = LatentDiffusion.from_config(tiny_config(objective=objective))
    params = perturbed(jax.jit(ldm.init)(jax.random.key(0)), jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
    t, labels = jnp.array([0.3, 0.7]), jnp.array([1, 2])
    output = jax.jit(ldm.output)
    guided = jax.jit(ldm.guided_output, static_argnums=4)
    cond = output(params, x, t, labels)
    null = output(params, x, t, jnp.full((2,), 4))
    np.testing.assert_allclose(guided(params, x, t, labels, 1.0), cond, atol=1e-6)
    got = guided(params, x, t, labels, 3.0)
    np.testing.assert_allclose(got[..., :4], null[..., :4] + 3.0 * (cond - null)[..., :4],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[..., 4:], cond[..., 4:], atol=1e-6)


def test_rf_loss_by_hand_at_initialisation():
    """At init v_hat = 0, so the loss is mean((eps - x)^2) with the loss's own rng split."""
    ldm = LatentDiffusion.from_config(tiny_config())
    params = jax.jit(ldm.init)(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))
    rng = jax.random.key(2)
    loss, metrics = jax.jit(ldm.loss_fn)(params, {"latent": x, "label": jnp.arange(4)}, rng)
    eps = jax.random.normal(jax.random.split(rng, 3)[2], x.shape)
    np.testing.assert_allclose(loss, jnp.mean((eps - x) ** 2), rtol=1e-6)
    assert metrics["velocity_mse"] == loss


def test_ddpm_loss_by_hand_at_initialisation():
    """At init the output is 0 (epsilon 0, variance halfway): L_simple is mean(eps^2), L_vlb the
    bound's term at the loss's own uniform timesteps."""
    ldm = LatentDiffusion.from_config(tiny_config(objective="ddpm"))
    params = jax.jit(ldm.init)(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))
    rng = jax.random.key(2)
    loss, metrics = jax.jit(ldm.loss_fn)(params, {"latent": x, "label": jnp.arange(4)}, rng)
    _, rng_t, rng_eps = jax.random.split(rng, 3)
    eps = jax.random.normal(rng_eps, x.shape)
    index = jax.random.randint(rng_t, (4,), 0, 1000)
    s = ldm.schedule
    vb = ddpm.vb_term(s, jnp.zeros((4, 8, 8, 8)), x, ddpm.q_sample(s, x, index, eps), index)
    np.testing.assert_allclose(metrics["eps_mse"], jnp.mean(eps ** 2), rtol=1e-6)
    np.testing.assert_allclose(metrics["vb_bits_per_dim"], jnp.mean(vb), rtol=1e-5)
    np.testing.assert_allclose(loss, jnp.mean(eps ** 2) + jnp.mean(vb), rtol=1e-6)


def test_labels_are_dropped_at_the_configured_rate():
    cfg = tiny_config(size=2)
    cfg.model.label_dropout = 0.25
    ldm = LatentDiffusion.from_config(cfg)
    params = jax.jit(ldm.init)(jax.random.key(0))
    batch = {"latent": jnp.zeros((2048, 2, 2, 4)), "label": jnp.zeros(2048, jnp.int32)}
    _, metrics = jax.jit(ldm.loss_fn)(params, batch, jax.random.key(3))
    assert abs(float(metrics["labels_dropped"]) - 0.25) < 0.03


def test_dit_xl_parameter_counts():
    """DiT-XL/2 on 32x32x4 latents (the same tokens and patch width as XL/1 on 16x16x16) with
    DiT's learned-sigma head and pos-embedding parameter is 675,129,632 (the DiT paper's count);
    ours has fixed positions, and the learned-sigma head only with the ddpm objective."""
    for arg, shape, expected in [("", (16, 16, 16), 674_834_720),
                                 ("objective=rf", (16, 16, 16), 674_816_272),
                                 ("c=8,objective=rf", (16, 16, 8), 674_797_832)]:
        ldm = LatentDiffusion.from_config(config_lib.ldm_config(arg))
        params = jax.eval_shape(ldm.init, jax.random.key(0))
        assert ldm.latent_shape == shape
        assert sum(p.size for p in jax.tree.leaves(params)) == expected
    learned_sigma_head, pos_embed = 1152 * 16 + 16, 256 * 1152
    assert 674_816_272 + learned_sigma_head == 674_834_720
    assert 674_834_720 + pos_embed == 675_129_632


@pytest.mark.parametrize("objective,sampler", [
    ("rf", "euler"), pytest.param("ddpm", "ddpm", marks=pytest.mark.slow)])
def test_tiny_dit_overfits_a_handful_of_latents(objective, sampler):
    """Four classes, one latent each: after training, sampling a class returns its latent."""
    cfg = tiny_config(size=4, channels=4, classes=4, objective=objective)
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
                                              sampler=sampler))(params, jax.random.key(7))
    distances = jnp.linalg.norm((samples[:, None] - targets[None]).reshape(8, 4, -1), axis=-1)
    assert jnp.all(jnp.argmin(distances, axis=1) == jnp.arange(8) % 4)
    # Closer to its own latent than the latents are to each other.
    own = distances[jnp.arange(8), jnp.arange(8) % 4]
    gaps = jnp.sqrt(jnp.sum((targets[:, None] - targets[None]) ** 2, axis=(2, 3, 4)))
    apart = jnp.min(gaps + 1e9 * jnp.eye(4))
    assert jnp.max(own) < 0.5 * apart, (own, apart)


@pytest.mark.parametrize("objective", ["rf", "ddpm"])
def test_samplers_go_through_the_guided_output(objective):
    """The sampler is diffusion.sample (rf) or ddpm.sample on the respaced schedule (ddpm) over
    guided_output, from noise and step keys split off the sampling key."""
    ldm = LatentDiffusion.from_config(tiny_config(objective=objective))
    params = perturbed(jax.jit(ldm.init)(jax.random.key(0)), jax.random.key(1))
    labels, rng = jnp.array([0, 1]), jax.random.key(5)
    sampler = "heun" if objective == "rf" else "ddpm"
    got = jax.jit(lambda p: ldm.sample(p, labels, rng, steps=3, sampler=sampler, guidance=2.0))(
        params)
    rng_noise, rng_steps = jax.random.split(rng)
    noise = jax.random.normal(rng_noise, (2, 8, 8, 4))

    def want(p):
        fn = lambda x, t: ldm.guided_output(p, x, t, labels, 2.0)  # noqa: E731
        if objective == "rf":
            return diffusion.sample(fn, noise, 3, "heun")
        return ddpm.sample(fn, noise, ldm.schedule.respaced(3), rng_steps)
    np.testing.assert_allclose(got, jax.jit(want)(params), rtol=1e-5, atol=1e-5)
