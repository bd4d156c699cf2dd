"""The latent diffusion model as pure functions: a class-conditional DiT trained with rectified
flow (velocity prediction) on normalised autoencoder latents, and its guided sampler.

Like `Autoencoder`, a `LatentDiffusion` is a pytree with only static config, so it can be passed
to jitted functions; parameters are a plain dict {'dit': ...}.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dgae_jax import diffusion
from dgae_jax.models.dit import DiT

Params = dict[str, Any]


def _build(config: ml_collections.FrozenConfigDict, rngs: nnx.Rngs) -> DiT:
    m = config.model
    return DiT(input_size=m.latent_size, channels=m.latent_channels, num_classes=m.num_classes,
               patch_size=m.patch_size, hidden=m.hidden, depth=m.depth, heads=m.heads,
               dtype=jnp.dtype(m.dtype), rngs=rngs)


@functools.lru_cache(maxsize=8)
def _graphdef(config: ml_collections.FrozenConfigDict) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: _build(config, nnx.Rngs(0))))[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentDiffusion:
    config: ml_collections.FrozenConfigDict = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "LatentDiffusion":
        return cls(ml_collections.FrozenConfigDict(config))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        m = self.config.model
        return (m.latent_size, m.latent_size, m.latent_channels)

    @property
    def null_label(self) -> int:
        return self.config.model.num_classes

    def init(self, rng: jax.Array) -> Params:
        return {"dit": nnx.to_pure_dict(nnx.state(_build(self.config, nnx.Rngs(rng))))}

    def velocity(self, params: Params, x_t: jax.Array, t: jax.Array,
                 labels: jax.Array) -> jax.Array:
        return nnx.merge(_graphdef(self.config), params["dit"])(x_t, t, labels)

    def guided_velocity(self, params: Params, x_t: jax.Array, t: jax.Array, labels: jax.Array,
                        scale: float) -> jax.Array:
        """Classifier-free guidance v_null + scale (v_label - v_null); scale 1 is the plain
        conditional prediction (and costs one evaluation, not two)."""
        if scale == 1.0:
            return self.velocity(params, x_t, t, labels)
        both = self.velocity(params, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                             jnp.concatenate([labels, jnp.full_like(labels, self.null_label)]))
        cond, null = jnp.split(both, 2)
        return null + scale * (cond - null)

    def loss_fn(self, params: Params, batch: dict, rng: jax.Array,
                step: jax.Array | int = 0) -> tuple[jax.Array, dict]:
        """Mean squared velocity error on normalised latents; labels are replaced by the null
        class with probability model.label_dropout (for classifier-free guidance)."""
        del step
        x, labels = batch["latent"].astype(jnp.float32), batch["label"]
        rng_drop, rng_t, rng_eps = jax.random.split(rng, 3)
        drop = jax.random.bernoulli(rng_drop, self.config.model.label_dropout, labels.shape)
        labels = jnp.where(drop, self.null_label, labels)
        d = self.config.diffusion
        t = diffusion.sample_time(rng_t, x.shape[0], d.time_sampling, d.time_loc, d.time_scale)
        eps = jax.random.normal(rng_eps, x.shape)
        v_hat = self.velocity(params, diffusion.interpolate(x, eps, t), t, labels)
        loss = jnp.mean((v_hat - diffusion.velocity_target(x, eps)) ** 2)
        return loss, {"loss": loss, "velocity_mse": loss,
                      "labels_dropped": jnp.mean(drop.astype(jnp.float32))}

    def sample(self, params: Params, labels: jax.Array, rng: jax.Array,
               steps: int | None = None, sampler: str | None = None,
               spacing: str | None = None, guidance: float | None = None) -> jax.Array:
        """Normalised latents for `labels`, from noise drawn with `rng` (defaults from
        config.diffusion; jit with steps, sampler, spacing and guidance static)."""
        d = self.config.diffusion
        guidance = d.guidance if guidance is None else guidance
        noise = jax.random.normal(rng, (labels.shape[0], *self.latent_shape))
        return diffusion.sample(
            lambda x_t, t: self.guided_velocity(params, x_t, t, labels, guidance), noise,
            steps or d.sample_steps, sampler or d.sampler, spacing or d.spacing)
