"""Use a trained DGAE (or the SD-VAE baseline) from Python, as one uses diffusers' AutoencoderKL.

    from dgae_jax import api
    ae = api.load("runs/demo")        # a run's workdir (newest intact checkpoint) or an export
    z = ae.encode(images)             # (N, H/f, W/f, c) float32 posterior means
    x = ae.decode(z, steps=10)        # (N, H, W, 3) uint8
    r = ae.reconstruct(images)        # decode(encode(images))

Images are uint8 (H, W, 3) or (N, H, W, 3) numpy arrays, PIL images, float arrays in [-1, 1], or
a list of any of these. An image whose height and width are multiples of `ae.size_multiple`
(the encoder's factor and the U-Net's downsampling; both networks are convolutional, and
attention runs over whatever positions a level has) is processed at its own size. Any other is
first resized (shorter side to `config.image_size`, bicubic, antialiased) and centre-cropped to
image_size x image_size, the evaluation view. A list of images of several sizes is processed
per size and returned as a list in the input's order; otherwise the result is one array.

Work is batched over all of this process's devices at a fixed batch size, so each input shape
compiles once. DGAE's decoder is a sampler: image i of a call starts from noise drawn with
fold_in(key(seed), i), so its result depends on the seed and its position i only, not on the
batch size, the device count or the other images of the call. Large inputs show a progress bar
(progress.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from dgae_jax import bundle, parallel, pixels, progress, runs
from dgae_jax.autoencoder import Autoencoder, unet_channel_mult
from dgae_jax.data import images as image_files, pipeline, sources
from dgae_jax.errors import ConfigError
from dgae_jax.tasks.trained import autoencoder_task, load_autoencoder


def load(path: str | os.PathLike, step: int | None = None, *,
         batch_size: int = 0) -> "TrainedAutoencoder":
    """The EMA autoencoder of a run's workdir (checkpoint `step`, default the newest intact
    one, verified against its checksums) or of a bundle written by `--mode=export`."""
    path = os.fspath(path)
    if bundle.is_bundle(path):
        config, params, saved = bundle.read(path)
        if step is not None and step != saved:
            raise ConfigError(f"step={step}: the bundle {path} holds step {saved}")
        return TrainedAutoencoder(config, params, step=saved, batch_size=batch_size)
    if not runs.is_run(path):
        raise ConfigError(f"{path} is neither a run's workdir (no checkpoints/) nor an exported "
                          f"bundle (no {bundle.WEIGHTS} and {bundle.CONFIG})")
    _, config = runs.saved_config(path, step)
    autoencoder_task(config, path)  # a DiT run is an error here, before any weights are read
    return TrainedAutoencoder.from_run(config, path, step, batch_size=batch_size)


class TrainedAutoencoder:
    """A trained autoencoder's EMA parameters on this process's devices, with jitted encode,
    decode and reconstruct. `config` is the run's (decode defaults come from config.diffusion)."""

    def __init__(self, config: ml_collections.ConfigDict, params: dict, *,
                 step: int | None = None, batch_size: int = 0,
                 mesh: jax.sharding.Mesh | None = None):
        self.config, self.step = config, step
        self.mesh = mesh or parallel.local_mesh()
        self.model = Autoencoder.from_config(config, with_lpips=False)
        params = {m: params[m] for m in ("encoder", "decoder")}
        self.params = jax.device_put(params, parallel.replicated(self.mesh))
        n = self.mesh.size
        self.batch_size = math.ceil((batch_size or config.batch_size) / n) * n
        self._encode = jax.jit(_encode, static_argnames="sample")
        self._decode = jax.jit(_decode, static_argnames=("steps", "sampler", "spacing"))
        self._reconstruct = jax.jit(_reconstruct,
                                    static_argnames=("steps", "sampler", "spacing"))

    @classmethod
    def from_run(cls, config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                 *, field: str = "step", batch_size: int = 0) -> "TrainedAutoencoder":
        """Checkpoint `step` (default the newest intact one) of the run in `workdir`, built
        with `config` (the run's, or one with other decode settings)."""
        mesh = parallel.local_mesh()
        step, _, ema = load_autoencoder(config, workdir, mesh, step, field)
        return cls(config, ema, step=step, batch_size=batch_size, mesh=mesh)

    # ----------------------------------------------------------------------------- facts
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(h, w, c) of an image of the training size, config.image_size."""
        return self.model.latent_shape

    @property
    def size_multiple(self) -> int:
        """Image sides that are multiples of this are processed at their own size."""
        m = self.config.model
        unet_levels = len(unet_channel_mult(self.config)) if m.decoder == "diffusion" else 1
        return math.lcm(m.spatial_factor, 2 ** max(unet_levels - 1, 0))

    # ----------------------------------------------------------------------------- work
    def encode(self, images, *, sample: bool = False, seed: int = 0):
        """Latents (N, H/f, W/f, c) float32: the posterior means, or with `sample` draws
        mean + std * n with image i's n from fold_in(key(seed), i)."""
        return self._run(self.prepare(images), "encode",
                         lambda x, i: self._encode(self.model, self.params, x, i, seed,
                                                   sample=sample))

    def decode(self, latents, *, steps: int | None = None, sampler: str | None = None,
               spacing: str | None = None, seed: int = 0):
        """uint8 images (N, h*f, w*f, 3) of latents (N, h, w, c) or (h, w, c) or a list.
        `steps`, `sampler`, `spacing` default to config.diffusion (DGAE only)."""
        kw = self.model.decode_settings(steps, sampler, spacing)
        return self._run(self._latents(latents), "decode",
                         lambda z, i: self._decode(self.model, self.params, z, i, seed, **kw))

    def reconstruct(self, images, *, steps: int | None = None, sampler: str | None = None,
                    spacing: str | None = None, seed: int = 0):
        """decode(encode(images)) in one compiled step: uint8 images the size of the
        (prepared) inputs."""
        kw = self.model.decode_settings(steps, sampler, spacing)
        return self._run(self.prepare(images), "reconstruct",
                         lambda x, i: self._reconstruct(self.model, self.params, x, i, seed,
                                                        **kw))

    def prepare(self, images) -> list[np.ndarray]:
        """The images as the networks see them: float32 (H, W, 3) in [-1, 1] each, at their
        own size or as the evaluation view (see the module docstring)."""
        out = []
        for image in _as_image_list(images):
            h, w = image.shape[:2]
            if h % self.size_multiple or w % self.size_multiple:
                size = self.config.image_size
                if image.dtype != np.uint8:
                    image = np.asarray(pixels.to_uint8(image))
                image = sources.crop_resize(image, pipeline.square_box(h, w, size), size)
            out.append(pixels.to_signed(image) if image.dtype == np.uint8
                       else image.astype(np.float32))
        return out

    # ----------------------------------------------------------------------------- batching
    def _latents(self, latents) -> list[np.ndarray]:
        if isinstance(latents, (list, tuple)):
            arrays = [np.asarray(z, np.float32) for z in latents]
        else:
            latents = np.asarray(latents, np.float32)
            arrays = list(latents[None] if latents.ndim == 3 else latents)
        c = self.config.model.latent_channels
        for z in arrays:
            if z.ndim != 3 or z.shape[-1] != c:
                raise ValueError(f"expected latents (h, w, {c}) or (N, h, w, {c}), got an "
                                 f"item of shape {z.shape}")
        return arrays

    def _run(self, items: list[np.ndarray], what: str, step: Callable):
        """`step(batch, indices)` over `items` grouped by shape, in fixed-size batches padded
        with zeros; the outputs in the items' order (one array if they share a shape)."""
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.shape, []).append(i)
        out: list = [None] * len(items)
        b, sharding = self.batch_size, parallel.batch_sharding(self.mesh)
        with progress.bar(len(items), what, quiet=len(items) <= b) as meter:
            for shape, indices in groups.items():
                for start in range(0, len(indices), b):
                    chunk = indices[start:start + b]
                    batch = np.zeros((b, *shape), np.float32)
                    batch[:len(chunk)] = np.stack([items[i] for i in chunk])
                    index = np.full((b,), -1, np.int32)
                    index[:len(chunk)] = chunk
                    result = np.asarray(step(jax.device_put(batch, sharding),
                                             jax.device_put(index, sharding)))
                    for k, i in enumerate(chunk):
                        out[i] = result[k]
                    meter.update(len(chunk))
        if len({o.shape for o in out}) == 1:
            return np.stack(out)
        return out


def _as_image_list(images) -> list[np.ndarray]:
    """uint8 or float (H, W, 3) arrays from any accepted input (see the module docstring)."""
    if isinstance(images, Image.Image):
        return [image_files.pil_to_rgb(images)]
    if isinstance(images, (list, tuple)):
        return [one for image in images for one in _as_image_list(image)]
    array = np.asarray(images)
    if array.ndim == 4:
        return [one for image in array for one in _as_image_list(image)]
    if array.dtype == np.uint8:
        return [sources.to_rgb(array)]
    if not np.issubdtype(array.dtype, np.floating) or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 images, float images in [-1, 1] (H, W, 3), or PIL "
                         f"images; got dtype {array.dtype} and shape {array.shape}")
    if not np.all(np.isfinite(array)) or array.min() < -1.001 or array.max() > 1.001:
        raise ValueError(f"float images must lie in [-1, 1]; got values in "
                         f"[{array.min():.3g}, {array.max():.3g}]")
    return [np.clip(array, -1.0, 1.0)]


# --------------------------------------------------------------------------- jitted steps
def _keys(seed, index: jax.Array) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(index)


def _encode(model: Autoencoder, params, x, index, seed, *, sample: bool):
    posterior = model.encode(params, x)
    if not sample:
        return posterior.mean
    noise = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:]))(
        _keys(seed, index))
    return posterior.mean + jnp.exp(0.5 * posterior.logvar) * noise


def _decode(model: Autoencoder, params, z, index, seed, **settings):
    noise = None
    if model.config.model.decoder == "diffusion":
        noise = jax.vmap(lambda k: jax.random.normal(k, model.image_shape(z)[1:]))(
            _keys(seed, index))
    return pixels.to_uint8(model.decode_from_noise(params, z, noise, **settings))


def _reconstruct(model: Autoencoder, params, x, index, seed, **settings):
    return _decode(model, params, model.encode(params, x).mean, index, seed, **settings)
