"""The latent diffusion model as pure functions: a class-conditional DiT on normalised
autoencoder latents, trained with one of two objectives, and its guided sampler.

`ddpm` (the default of configs/ldm_f16.py): DiT's own recipe, the one epsilon-VAE's and DGAE's
generation tables follow (ddpm.py: epsilon prediction with a learned variance, L_simple + L_vlb,
ancestral sampling on 250 respaced steps). `rf`: rectified flow as the autoencoder's decoder uses
it (diffusion.py: velocity prediction, logit-normal times, Euler/Heun). Classifier-free guidance
is one function for both.

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

from dgae_jax import ddpm, diffusion
from dgae_jax.models.dit import DiT

Params = dict[str, Any]
OBJECTIVES = ("ddpm", "rf")


def _build(config: ml_collections.FrozenConfigDict, rngs: nnx.Rngs) -> DiT:
    m = config.model
    learned_variance = config.diffusion.objective == "ddpm"
    return DiT(input_size=m.latent_size, channels=m.latent_channels, num_classes=m.num_classes,
               patch_size=m.patch_size, hidden=m.hidden, depth=m.depth, heads=m.heads,
               out_channels=m.latent_channels * (2 if learned_variance else 1),
               dtype=jnp.dtype(m.dtype), rngs=rngs)


@functools.lru_cache(maxsize=8)
def _graphdef(config: ml_collections.FrozenConfigDict) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: _build(config, nnx.Rngs(0))))[0]


@functools.lru_cache(maxsize=8)
def _schedule(num_timesteps: int, beta_start: float, beta_end: float) -> ddpm.Schedule:
    return ddpm.Schedule.from_betas(ddpm.linear_betas(num_timesteps, beta_start, beta_end))


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

    @property
    def schedule(self) -> ddpm.Schedule:
        """The DDPM training schedule (objective 'ddpm')."""
        d = self.config.diffusion
        return _schedule(d.num_timesteps, d.beta_start, d.beta_end)

    def output(self, params: Params, x_t: jax.Array, t: jax.Array,
               labels: jax.Array) -> jax.Array:
        """The DiT's prediction: a velocity (rf), or epsilon and the variance interpolation
        (ddpm, 2C channels)."""
        return nnx.merge(_graphdef(self.config), params["dit"])(x_t, t, labels)

    def guided_output(self, params: Params, x_t: jax.Array, t: jax.Array, labels: jax.Array,
                      scale: float) -> jax.Array:
        """Classifier-free guidance null + scale (label - null) on the C predicted channels
        (velocity or epsilon); a learned variance is the conditional one, as DiT's
        forward_with_cfg. Scale 1 is the plain conditional output (one evaluation, not two)."""
        if scale == 1.0:
            return self.output(params, x_t, t, labels)
        both = self.output(params, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                           jnp.concatenate([labels, jnp.full_like(labels, self.null_label)]))
        cond, null = jnp.split(both, 2)
        c = self.config.model.latent_channels
        guided = null[..., :c] + scale * (cond[..., :c] - null[..., :c])
        return jnp.concatenate([guided, cond[..., c:]], axis=-1)

    def loss_fn(self, params: Params, batch: dict, rng: jax.Array,
                step: jax.Array | int = 0) -> tuple[jax.Array, dict]:
        """The objective's loss on normalised latents; labels are replaced by the null class
        with probability model.label_dropout (for classifier-free guidance)."""
        del step
        x, labels = batch["latent"].astype(jnp.float32), batch["label"]
        rng_drop, rng_t, rng_eps = jax.random.split(rng, 3)
        drop = jax.random.bernoulli(rng_drop, self.config.model.label_dropout, labels.shape)
        labels = jnp.where(drop, self.null_label, labels)
        eps = jax.random.normal(rng_eps, x.shape)
        if self.config.diffusion.objective == "ddpm":
            loss, metrics = self._ddpm_loss(params, x, labels, rng_t, eps)
        else:
            loss, metrics = self._rf_loss(params, x, labels, rng_t, eps)
        return loss, {**metrics, "labels_dropped": jnp.mean(drop.astype(jnp.float32))}

    def _rf_loss(self, params, x, labels, rng_t, eps):
        """Mean squared velocity error at logit-normal (or uniform) times."""
        d = self.config.diffusion
        t = diffusion.sample_time(rng_t, x.shape[0], d.time_sampling, d.time_loc, d.time_scale)
        v_hat = self.output(params, diffusion.interpolate(x, eps, t), t, labels)
        loss = jnp.mean((v_hat - diffusion.velocity_target(x, eps)) ** 2)
        return loss, {"loss": loss, "velocity_mse": loss}

    def _ddpm_loss(self, params, x, labels, rng_t, eps):
        """L_simple + L_vlb at timesteps uniform over the training schedule (DiT)."""
        s = self.schedule
        index = jax.random.randint(rng_t, (x.shape[0],), 0, s.num_steps)
        x_t = ddpm.q_sample(s, x, index, eps)
        terms = ddpm.training_losses(s, self.output(params, x_t, s.network_time(index), labels),
                                     x, x_t, index, eps)
        terms = {k: jnp.mean(v) for k, v in terms.items()}
        return terms["loss"], {"loss": terms["loss"], "eps_mse": terms["mse"],
                               "vb_bits_per_dim": terms["vb"]}

    def sample(self, params: Params, labels: jax.Array, rng: jax.Array,
               steps: int | None = None, sampler: str | None = None,
               spacing: str | None = None, guidance: float | None = None) -> jax.Array:
        """Normalised latents for `labels`, from noise drawn with `rng` (defaults from
        config.diffusion; jit with steps, sampler, spacing and guidance static). ddpm samples
        ancestrally on `steps` respaced timesteps, rf integrates the ODE."""
        d = self.config.diffusion
        s = diffusion.settings(d, steps, sampler, spacing)
        guidance = d.guidance if guidance is None else guidance
        rng_noise, rng_steps = jax.random.split(rng)
        noise = jax.random.normal(rng_noise, (labels.shape[0], *self.latent_shape))

        def output_fn(x_t, t):
            return self.guided_output(params, x_t, t, labels, guidance)
        if d.objective == "ddpm":
            if s["sampler"] not in ddpm.SAMPLERS or s["spacing"] != "uniform":
                raise ValueError(f"the ddpm objective samples with {ddpm.SAMPLERS} on uniform "
                                 f"respacing, not {s['sampler']!r} on {s['spacing']!r}")
            return ddpm.sample(output_fn, noise, self.schedule.respaced(s["steps"]), rng_steps)
        return diffusion.sample(output_fn, noise, **s)
