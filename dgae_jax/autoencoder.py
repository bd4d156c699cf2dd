"""The autoencoder as pure functions of (params, inputs, rng): DGAE and the SD-VAE baseline.

`Autoencoder` holds no trainable state. Its static part is the config; its only array leaves are
the frozen LPIPS weights, so that when the object is passed *as an argument* to a jitted function
(`jax.jit(Autoencoder.loss_fn)(ae, params, batch, rng)`) those weights enter the executable as
inputs rather than as constants baked into it. `params` is a plain nested dict
{'encoder', 'decoder'[, 'discriminator']} of float32 arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dgae_jax import diffusion
from dgae_jax.errors import ConfigError
from dgae_jax.metrics import lpips
from dgae_jax.models.conv_decoder import ConvDecoder
from dgae_jax.models.discriminator import PatchDiscriminator
from dgae_jax.models.encoder import Encoder
from dgae_jax.models.unet import ADM_CHANNEL_MULT, UNet

Params = dict[str, Any]
Metrics = dict[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Posterior:
    """Diagonal Gaussian q(z|x) with SD-VAE's log-variance clipping to [-30, 20]."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "Posterior":
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    def sample(self, rng: jax.Array) -> jax.Array:
        """Reparameterised z = mean + std * n."""
        return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(rng, self.mean.shape)

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) summed over each example's latent elements, shape (B,)."""
        terms = self.mean**2 + jnp.exp(self.logvar) - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, self.mean.ndim)))


def unet_channel_mult(config: ml_collections.ConfigDict) -> tuple:
    mult = tuple(config.model.unet.channel_mult)
    if mult:
        return mult
    if config.image_size not in ADM_CHANNEL_MULT:
        raise ConfigError(f"model.unet.channel_mult is empty and ADM has no default for "
                         f"image_size={config.image_size}; set it explicitly")
    return ADM_CHANNEL_MULT[config.image_size]


def size_multiple(config: ml_collections.ConfigDict) -> int:
    """What an image side must be a multiple of for both networks: the encoder's factor and the
    U-Net's downsampling (both are convolutional, and attention runs over whatever positions a
    level has)."""
    m = config.model
    unet_levels = len(unet_channel_mult(config)) if m.decoder == "diffusion" else 1
    return math.lcm(m.spatial_factor, 2 ** max(unet_levels - 1, 0))


def check_tile(config: ml_collections.ConfigDict, tile: int | None, field: str) -> None:
    """A tile side (pixels) the networks can run on: None (tile what is larger than the training
    size), 0 (never) or a multiple of size_multiple of at least two latent positions."""
    if tile is None or tile == 0:
        return
    multiple, least = size_multiple(config), 2 * config.model.spatial_factor
    if not isinstance(tile, int) or tile < least or tile % multiple:
        raise ConfigError(f"{field}={tile!r} is not None, 0 or a multiple of {multiple} pixels "
                          f"of at least {least}")


def _build(config: ml_collections.FrozenConfigDict, name: str, rngs: nnx.Rngs) -> nnx.Module:
    m = config.model
    common = dict(resolution=config.image_size, latent_channels=m.latent_channels,
                  norm_groups=m.norm_groups, dtype=jnp.dtype(m.dtype), rngs=rngs)
    if name == "encoder":
        return Encoder(**common, **m.encoder)
    if name == "decoder" and m.decoder == "diffusion":
        unet = dict(m.unet, channel_mult=unet_channel_mult(config))
        return UNet(**common, **unet)
    if name == "decoder":
        return ConvDecoder(**common, **m.conv_decoder)
    return PatchDiscriminator(**m.discriminator, dtype=common["dtype"], rngs=rngs)


@functools.lru_cache(maxsize=16)
def _graphdefs(config: ml_collections.FrozenConfigDict, names: tuple[str, ...]) -> dict:
    return {n: nnx.split(nnx.eval_shape(lambda n=n: _build(config, n, nnx.Rngs(0))))[0]
            for n in names}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Autoencoder:
    config: ml_collections.FrozenConfigDict = dataclasses.field(metadata=dict(static=True))
    lpips_weights: Any = None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, *,
                    with_lpips: bool = True) -> "Autoencoder":
        """Loads LPIPS when the loss uses it and `with_lpips` (training); encoding and decoding
        need no LPIPS (`with_lpips=False`). The config is checked at start-up (validation.py)."""
        weights = (lpips.load_weights(config.loss.lpips_net)
                   if with_lpips and config.loss.lpips_weight > 0 else None)
        return cls(ml_collections.FrozenConfigDict(config), weights)

    # ----------------------------------------------------------------------------- structure
    @property
    def module_names(self) -> tuple[str, ...]:
        gan = self.config.model.decoder == "conv" and self.config.loss.gan_weight > 0
        return ("encoder", "decoder") + (("discriminator",) if gan else ())

    @property
    def frozen_encoder(self) -> bool:
        """Whether the encoder is pretrained and never trains (init.freeze_encoder)."""
        return bool(self.config.get("init", {}).get("freeze_encoder", False))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        m = self.config.model
        return (self.config.image_size // m.spatial_factor,) * 2 + (m.latent_channels,)

    def init(self, rng: jax.Array) -> Params:
        """Fresh float32 parameters; jit it with out_shardings to create them sharded."""
        keys = jax.random.split(rng, len(self.module_names))
        return {n: nnx.to_pure_dict(nnx.state(_build(self.config, n, nnx.Rngs(k))))
                for n, k in zip(self.module_names, keys)}

    def _module(self, params: Params, name: str) -> nnx.Module:
        return nnx.merge(_graphdefs(self.config, self.module_names)[name], params[name])

    # ----------------------------------------------------------------------------- inference
    def encode(self, params: Params, x: jax.Array) -> Posterior:
        """x: (B, H, W, 3) in [-1, 1] -> q(z|x)."""
        dtype = jnp.dtype(self.config.model.dtype)
        return Posterior.from_moments(self._module(params, "encoder")(x.astype(dtype)))

    def velocity(self, params: Params, x_t: jax.Array, t: jax.Array, z: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.config.model.dtype)
        unet = self._module(params, "decoder")
        return unet(x_t.astype(dtype), t, z.astype(dtype)).astype(jnp.float32)

    def image_shape(self, z: jax.Array) -> tuple[int, int, int, int]:
        """(B, H, W, 3) of the images that latents `z` (B, h, w, c) decode to."""
        f = self.config.model.spatial_factor
        return (z.shape[0], z.shape[1] * f, z.shape[2] * f, 3)

    def decode(self, params: Params, z: jax.Array, rng: jax.Array, steps: int | None = None,
               sampler: str | None = None, spacing: str | None = None) -> jax.Array:
        """z -> image in about [-1, 1], at the size of the latent (x spatial_factor).

        DGAE starts from Gaussian noise drawn with `rng` and integrates the flow ODE for `steps`
        steps (defaults from config.diffusion; jit with these three as static arguments). The
        conv baseline is deterministic and ignores them.
        """
        noise = (None if self.config.model.decoder == "conv"
                 else jax.random.normal(rng, self.image_shape(z)))
        return self.decode_from_noise(params, z, noise, steps, sampler, spacing)

    def decode_settings(self, steps: int | None = None, sampler: str | None = None,
                        spacing: str | None = None) -> dict:
        """The keyword arguments of a DGAE decode: each given one, else config.diffusion's. The
        conv decoder has none ({}; giving one is an error)."""
        if self.config.model.decoder == "conv":
            if (steps, sampler, spacing) != (None, None, None):
                raise ValueError("the conv decoder (model.decoder='conv') has no decode settings")
            return {}
        return diffusion.settings(self.config.diffusion, steps, sampler, spacing)

    def decode_record(self, steps: int | None = None, sampler: str | None = None,
                      spacing: str | None = None) -> dict:
        """How reconstructions are decoded, as recorded next to their metrics:
        {'decode_steps', 'sampler', 'spacing'}, or {'decode_steps': 1} for the conv decoder."""
        settings = self.decode_settings(steps, sampler, spacing)
        return {"decode_steps": settings.pop("steps", 1), **settings}

    def decode_from_noise(self, params: Params, z: jax.Array, noise: jax.Array | None,
                          steps: int | None = None, sampler: str | None = None,
                          spacing: str | None = None) -> jax.Array:
        """`decode` from given starting noise (B, H, W, 3), so that callers can make each
        image's noise independent of how images are batched (api.py). The conv decoder takes
        None."""
        dtype = jnp.dtype(self.config.model.dtype)
        if self.config.model.decoder == "conv":
            return self._module(params, "decoder")(z.astype(dtype)).astype(jnp.float32)
        return diffusion.sample(lambda x_t, t: self.velocity(params, x_t, t, z), noise,
                                **self.decode_settings(steps, sampler, spacing))

    def reconstruct(self, params: Params, x: jax.Array, rng: jax.Array, **decode_kwargs):
        """Decode the posterior mean (the deterministic code of x)."""
        return self.decode(params, self.encode(params, x).mean, rng, **decode_kwargs)

    # ----------------------------------------------------------------------------- training
    def lpips_loss(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.mean(lpips.lpips_distance(self.lpips_weights, a, b,
                                             net=self.config.loss.lpips_net,
                                             dtype=jnp.dtype(self.config.model.dtype)))

    def loss_fn(self, params: Params, batch: dict, rng: jax.Array,
                step: jax.Array | int = 0) -> tuple[jax.Array, Metrics]:
        """Total loss and every term separately. `step` gates the conv baseline's GAN.

        `rng` splits into three keys: the posterior sample, the diffusion time, the noise.
        The decoder sees a posterior sample or its mean (loss.latents). With a frozen encoder
        the KL term, which only trains the encoder, is reported but not added.

        The reconstruction terms are means over pixels; SD-VAE (CompVis LPIPSWithDiscriminator)
        sums them over the 3*H*W values of each image and adds `kl_weight` x the per-image KL
        sum. Dividing SD-VAE's total by 3*H*W gives this loss, so `kl_weight` keeps SD-VAE's
        meaning (1e-6) and its relative strength at every image size.
        """
        x = batch["image"].astype(jnp.float32)
        rng_z, rng_t, rng_eps = jax.random.split(rng, 3)
        posterior = self.encode(params, x)
        z = (posterior.mean if self.config.loss.get("latents", "sample") == "mean"
             else posterior.sample(rng_z))
        kl = jnp.mean(posterior.kl())
        if self.config.model.decoder == "diffusion":
            loss, metrics = self._diffusion_terms(params, x, z, rng_t, rng_eps)
        else:
            loss, metrics = self._conv_terms(params, x, z, step)
        if not self.frozen_encoder:
            loss = loss + self.config.loss.kl_weight * kl / _values_per_image(x)
        return loss, {"loss": loss, "kl": kl, **metrics}

    def _diffusion_terms(self, params, x, z, rng_t, rng_eps):
        """alpha * |v_hat - v|^2 + eta * LPIPS(x_t - t v_hat, x)   (paper Eq. 8 minus KL)."""
        w, d = self.config.loss, self.config.diffusion
        t = diffusion.sample_time(rng_t, x.shape[0], d.time_sampling, d.time_loc, d.time_scale)
        eps = jax.random.normal(rng_eps, x.shape)
        x_t = diffusion.interpolate(x, eps, t)
        v_hat = self.velocity(params, x_t, t, z)
        mse = jnp.mean((v_hat - diffusion.velocity_target(x, eps)) ** 2)
        x0_hat = diffusion.clean_estimate(x_t, t, v_hat)
        loss = w.velocity_weight * mse
        metrics = {"velocity_mse": mse, "x0_mse": jnp.mean((x0_hat - x) ** 2)}
        if w.lpips_weight > 0:
            metrics["lpips"] = self.lpips_loss(x0_hat, x)
            loss = loss + w.lpips_weight * metrics["lpips"]
        return loss, metrics

    def _conv_terms(self, params, x, z, step):
        """SD-VAE: L1 + LPIPS, plus the PatchGAN hinge game with the adaptive weight."""
        w = self.config.loss
        dtype = jnp.dtype(self.config.model.dtype)
        decoder = self._module(params, "decoder")
        h = decoder.features(z.astype(dtype))
        x_hat = decoder.conv_out(h).astype(jnp.float32)

        def reconstruction(img):
            l1 = jnp.mean(jnp.abs(img - x))
            lp = self.lpips_loss(img, x) if w.lpips_weight > 0 else jnp.zeros(())
            return w.l1_weight * l1 + w.lpips_weight * lp, {"l1": l1, "lpips": lp}

        rec, metrics = reconstruction(x_hat)
        if "discriminator" not in params:
            return rec, metrics
        disc = self._module(params, "discriminator")
        frozen_disc = self._module(jax.lax.stop_gradient(params), "discriminator")

        def generator(img):
            return -jnp.mean(frozen_disc(img.astype(dtype)))

        g_loss = generator(x_hat)
        # SD-VAE's adaptive weight: |grad rec| / |grad gan| at the decoder's last layer kernel.
        head_def, head_state = nnx.split(decoder.conv_out)
        h_fixed = jax.lax.stop_gradient(h)
        _, head_vjp = jax.vjp(lambda s: nnx.merge(head_def, s)(h_fixed).astype(jnp.float32),
                              jax.lax.stop_gradient(head_state))
        x_fixed = jax.lax.stop_gradient(x_hat)
        g_rec = head_vjp(jax.grad(lambda i: reconstruction(i)[0])(x_fixed))[0]["kernel"][...]
        g_gan = head_vjp(jax.grad(generator)(x_fixed))[0]["kernel"][...]
        # On SD-VAE's summed scale (its epsilon 1e-4 and clamp 1e4 act there): the summed
        # reconstruction's gradient is 3*H*W times ours, and its weighted GAN term enters our
        # per-pixel loss divided by 3*H*W.
        n = _values_per_image(x)
        adaptive = jnp.clip(n * jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_gan) + 1e-4), 0.0,
                            1e4)
        adaptive = jax.lax.stop_gradient(adaptive) * w.gan_weight
        on = (jnp.asarray(step) >= w.gan_start).astype(jnp.float32)
        logits_real = disc(jax.lax.stop_gradient(x).astype(dtype))
        logits_fake = disc(x_fixed.astype(dtype))
        d_loss = 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real))
                        + jnp.mean(jax.nn.relu(1.0 + logits_fake)))
        loss = rec + on * (adaptive * g_loss / n + d_loss)
        metrics.update(g_loss=g_loss, d_loss=d_loss, gan_weight=adaptive, gan_on=on,
                       logits_real=jnp.mean(logits_real), logits_fake=jnp.mean(logits_fake))
        return loss, metrics


def _values_per_image(x: jax.Array) -> int:
    """3 * H * W: what SD-VAE's summed reconstruction terms add up over, per image."""
    return x.shape[1] * x.shape[2] * x.shape[3]
