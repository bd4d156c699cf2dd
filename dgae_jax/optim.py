"""Optimiser and EMA, shared by the autoencoder and the latent DiT.

Paper (section 4.1): AdamW(0.9, 0.95, eps 1e-8, weight decay 0.1), lr 1e-4 with a 10k-step linear
warm-up then cosine decay to 1e-5, global-norm clipping at 1.0 (`clip_norm` 0: none). Weight decay skips vectors
(biases, norm scales), the usual AdamW practice. A PatchGAN discriminator, when present, gets
SD-VAE's own Adam(0.5, 0.9) at the same learning rate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
    o = config.optimizer
    warmup = min(o.warmup_steps, config.total_steps)
    if warmup == 0:
        return optax.cosine_decay_schedule(o.lr, max(config.total_steps, 1),
                                           alpha=o.end_lr / o.lr if o.lr else 0.0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
        decay_steps=max(config.total_steps, warmup + 1), end_value=o.end_lr)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optimizer
    schedule = learning_rate(config)

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)

    main = optax.chain(
        optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=decay_mask))
    disc = optax.adam(schedule, b1=0.5, b2=0.9)  # SD-VAE's discriminator optimiser, no clipping

    def labels(params):
        return {k: jax.tree.map(lambda _, k=k: "disc" if k == "discriminator" else "main", v)
                for k, v in params.items()}

    return optax.multi_transform({"main": main, "disc": disc}, labels)


def ema_decay(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """`config.ema_decay`, ramped up as (1 + step) / (10 + step) so the EMA tracks early on."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))


def update_ema(ema, params, decay: jax.Array):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
