"""Use a trained DGAE (or the SD-VAE baseline) from Python, as one uses diffusers' AutoencoderKL.

    from dgae_jax import api
    ae = api.load("runs/demo")        # a run's workdir (newest intact checkpoint) or an export
    z = ae.encode(images)             # (N, H/f, W/f, c) float32 posterior means
    x = ae.decode(z, steps=10)        # (N, H, W, 3) uint8
    r = ae.reconstruct(images)        # decode(encode(images))
    x = ae.decode(sd_latents, scaled=True)   # latents in SD's scaled convention (raw x 0.18215)

Images are uint8 (H, W, 3) or (N, H, W, 3) numpy arrays, PIL images, float arrays in [-1, 1], or
a list of any of these, of any size: each is processed at its own size, an output pixel at its
input pixel. Sides that are not multiples of what the networks need (`ae.size_multiple`: the
encoder's factor and the U-Net's downsampling) are padded at the bottom and right by reflection
and the result cropped back; `encode` gives ceil(H/f) x ceil(W/f) latents. A list of images of
several sizes is returned as a list in the input's order; otherwise the result is one array.

Images larger than the training size (`config.image_size`) are processed in overlapping tiles
of it, blended so that no seam shows (tiling.py): memory stays bounded and the networks compile
once per tile shape. `tile=0` turns tiling off, `tile=N` tiles with N-pixel tiles. `dtype`
(`load(..., dtype="bfloat16")`) sets the compute precision; parameters, normalisation statistics
and the sampler's state stay float32.

Untiled work is batched over all of this process's devices at a fixed batch size, so each input
shape compiles once. DGAE's decoder is a sampler: image i of a call starts from noise drawn with
fold_in(key(seed), i) (of its padded size), so its result depends on the seed and its position i
only, not on the batch size, the device count or the other images of the call. Large inputs
show a progress bar (progress.py).
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

from dgae_jax import bundle, checks, parallel, pixels, progress, runs, tiling
from dgae_jax.autoencoder import Autoencoder, check_tile, size_multiple
from dgae_jax.data import images as image_files, sources
from dgae_jax.errors import ConfigError
from dgae_jax.tasks.trained import autoencoder_task, load_autoencoder


def load(path: str | os.PathLike, step: int | None = None, *, dtype: str | None = None,
         batch_size: int = 0) -> "TrainedAutoencoder":
    """The EMA autoencoder of a run's workdir (checkpoint `step`, default the newest intact
    one, verified against its checksums) or of a bundle written by `--mode=export`, computing
    in `dtype` ("float32", "bfloat16", "float16"; None keeps the run's model.dtype)."""
    path = os.fspath(path)
    if bundle.is_bundle(path):
        config, params, saved = bundle.read(path)
        if step is not None and step != saved:
            raise ConfigError(f"step={step}: the bundle {path} holds step {saved}")
        return TrainedAutoencoder(config, params, step=saved, dtype=dtype, batch_size=batch_size)
    if not runs.is_run(path):
        raise ConfigError(f"{path} is neither a run's workdir (no checkpoints/) nor an exported "
                          f"bundle (no {bundle.WEIGHTS} and {bundle.CONFIG})")
    _, config = runs.saved_config(path, step)
    autoencoder_task(config, path)  # a DiT run is an error here, before any weights are read
    return TrainedAutoencoder.from_run(config, path, step, dtype=dtype, batch_size=batch_size)


class TrainedAutoencoder:
    """A trained autoencoder's EMA parameters on this process's devices, with jitted encode,
    decode and reconstruct. `config` is the run's (decode defaults come from config.diffusion)."""

    def __init__(self, config: ml_collections.ConfigDict, params: dict, *,
                 step: int | None = None, dtype: str | None = None, batch_size: int = 0,
                 mesh: jax.sharding.Mesh | None = None):
        if dtype is not None:
            checks.one_of(dtype, checks.DTYPES, "dtype")
            config = ml_collections.ConfigDict(config.to_dict())
            config.model.dtype = dtype
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
        # The tiled path's networks, on batches of tiles of one shape.
        self._tile_moments = jax.jit(_moments)
        self._tile_velocity = jax.jit(_velocity)
        self._tile_conv_decode = jax.jit(_conv_decode)

    @classmethod
    def from_run(cls, config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                 *, field: str = "step", dtype: str | None = None,
                 batch_size: int = 0) -> "TrainedAutoencoder":
        """Checkpoint `step` (default the newest intact one) of the run in `workdir`, built
        with `config` (the run's, or one with other decode settings)."""
        mesh = parallel.local_mesh()
        step, _, ema = load_autoencoder(config, workdir, mesh, step, field)
        return cls(config, ema, step=step, dtype=dtype, batch_size=batch_size, mesh=mesh)

    # ----------------------------------------------------------------------------- facts
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(h, w, c) of an image of the training size, config.image_size."""
        return self.model.latent_shape

    @property
    def scaling_factor(self) -> float | None:
        """SD's latent scale (model.scaling_factor): `scaled=True` latents are the raw ones
        times it; None where the run has none."""
        return self.config.model.get("scaling_factor")

    def _scale(self, scaled: bool) -> float:
        if not scaled:
            return 1.0
        if self.scaling_factor is None:
            raise ValueError("scaled=True, but this run has no model.scaling_factor (set it "
                             "when training, or give raw latents)")
        return self.scaling_factor

    @property
    def size_multiple(self) -> int:
        """What image sides are padded to a multiple of, and tile sides must be a multiple of."""
        return size_multiple(self.config)

    # ----------------------------------------------------------------------------- work
    def encode(self, images, *, sample: bool = False, seed: int = 0, tile: int | None = None,
               scaled: bool = False):
        """Latents (N, ceil(H/f), ceil(W/f), c) float32: the posterior means, or with `sample`
        draws mean + std * n with image i's n from fold_in(key(seed), i); with `scaled`, times
        `scaling_factor` (SD's convention). `tile`: None tiles images larger than the training
        size, 0 never, N with N-pixel tiles."""
        f, scale = self.config.model.spatial_factor, self._scale(scaled)
        items = self.prepare(images)
        latents = self._work(
            items, self._tiles(items, tile, 1), "encode", f, 1 / f,
            lambda x, i: self._encode(self.model, self.params, x, i, seed, sample=sample),
            lambda x, i, t: self._encode_tiled(x, i, t, seed, sample))
        if scale == 1.0:
            return latents
        if isinstance(latents, list):
            return [z * np.float32(scale) for z in latents]
        return latents * np.float32(scale)

    def decode(self, latents, *, steps: int | None = None, sampler: str | None = None,
               spacing: str | None = None, seed: int = 0, tile: int | None = None,
               scaled: bool = False):
        """uint8 images (N, h*f, w*f, 3) of latents (N, h, w, c) or (h, w, c) or a list.
        `scaled`: the latents are in SD's scaled convention (raw times `scaling_factor`, as an
        SD pipeline's), divided by it first. `steps`, `sampler`, `spacing` default to
        config.diffusion (DGAE only); `tile` as in `encode`, in pixels of the image."""
        kw = self.model.decode_settings(steps, sampler, spacing)
        f, scale = self.config.model.spatial_factor, self._scale(scaled)
        items = self._latents(latents)
        if scale != 1.0:
            items = [z / np.float32(scale) for z in items]
        return self._work(
            items, self._tiles(items, tile, f), "decode", self.size_multiple // f, f,
            lambda z, i: self._decode(self.model, self.params, z, i, seed, **kw),
            lambda z, i, t: pixels.to_uint8(self._decode_tiled(z, i, t, seed, kw)))

    def reconstruct(self, images, *, steps: int | None = None, sampler: str | None = None,
                    spacing: str | None = None, seed: int = 0, tile: int | None = None):
        """decode(encode(images)), in one compiled step when untiled: uint8 images the size of
        the inputs. Arguments as in `encode` and `decode`."""
        kw = self.model.decode_settings(steps, sampler, spacing)
        items = self.prepare(images)

        def tiled(x, i, t):
            z = self._encode_tiled(x, i, t, seed, False)
            return pixels.to_uint8(self._decode_tiled(z, i, t, seed, kw)[:x.shape[0],
                                                                          :x.shape[1]])
        return self._work(
            items, self._tiles(items, tile, 1), "reconstruct", self.size_multiple, 1,
            lambda x, i: self._reconstruct(self.model, self.params, x, i, seed, **kw), tiled)

    def prepare(self, images) -> list[np.ndarray]:
        """The images as the networks see them: float32 (H, W, 3) in [-1, 1] each."""
        return [pixels.to_signed(image) if image.dtype == np.uint8 else image.astype(np.float32)
                for image in _as_image_list(images)]

    # ----------------------------------------------------------------------------- tiling
    def _tiles(self, items: list[np.ndarray], tile: int | None, unit: int) -> list[int]:
        """Each item's tile side in pixels, 0 for untiled; `unit` is pixels per item position.
        None tiles what is larger than the training size, with tiles of it; 0 never tiles."""
        check_tile(self.config, tile, "tile")
        if tile is not None:
            return [tile] * len(items)
        size = self.config.image_size
        return [size if max(item.shape[:2]) * unit > size else 0 for item in items]

    def _tiled_input(self, x: np.ndarray, tile: int, unit: int):
        """`x` (item positions of `unit` pixels) padded by reflection at the bottom and right to
        whole latent positions and at least one tile of `tile` pixels; its latent tile grid."""
        per = self.config.model.spatial_factor // unit  # item positions per latent position
        size = tile // self.config.model.spatial_factor
        h, w = (max(-(-side // per), size) for side in x.shape[:2])
        grid = tiling.Grid.of(h, w, size)
        return _pad(x, h * per, w * per), grid

    def _encode_tiled(self, x: np.ndarray, index: int, tile: int, seed: int,
                      sample: bool) -> np.ndarray:
        """The blended posterior of one image (H, W, 3) from tiles of `tile` pixels."""
        f = self.config.model.spatial_factor
        padded, grid = self._tiled_input(x, tile, 1)
        moments = grid.map(lambda t: self._tile_moments(self.model, self.params, self._shard(t)),
                           [(padded, f)], 1, self.batch_size)
        h, w = -(-x.shape[0] // f), -(-x.shape[1] // f)
        mean, logvar = np.split(moments[:h, :w], 2, axis=-1)
        if not sample:
            return mean
        key = jax.random.fold_in(jax.random.key(seed), index)
        return mean + np.exp(0.5 * logvar) * np.asarray(jax.random.normal(key, mean.shape))

    def _decode_tiled(self, z: np.ndarray, index: int, tile: int, seed: int,
                      settings: dict) -> np.ndarray:
        """One latent (h, w, c) decoded from tiles of `tile` pixels: float32 pixels."""
        f = self.config.model.spatial_factor
        padded, grid = self._tiled_input(z, tile, f)
        if self.config.model.decoder == "conv":
            x = grid.map(
                lambda t: self._tile_conv_decode(self.model, self.params, self._shard(t)),
                [(padded, 1)], f, self.batch_size)
        else:
            key = jax.random.fold_in(jax.random.key(seed), index)
            noise = np.asarray(jax.random.normal(key, (grid.h * f, grid.w * f, 3)))
            x = tiling.decode_flow(
                lambda xt, t, zt: self._tile_velocity(self.model, self.params, self._shard(xt),
                                                      t, self._shard(zt)),
                grid, padded, noise, f, batch=self.batch_size, **settings)
        return x[:z.shape[0] * f, :z.shape[1] * f]

    def _shard(self, batch: np.ndarray) -> jax.Array:
        return jax.device_put(batch, parallel.batch_sharding(self.mesh))

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

    def _work(self, items: list[np.ndarray], tiles: list[int], what: str, multiple: int,
              scale: float, step: Callable, tiled: Callable):
        """Each item through `tiled(item, index, tile)` where its tile is set, the others
        through `step(batch, indices)` padded to `multiple` and cropped back (outputs `scale`
        times the item's size); the outputs in the items' order (one array if they share a
        shape)."""
        out: list = [None] * len(items)
        plain = [i for i, t in enumerate(tiles) if not t]
        for i, result in zip(plain, self._batched([_pad(items[i], *(
                -(-s // multiple) * multiple for s in items[i].shape[:2])) for i in plain],
                plain, what, step)):
            h, w = (math.ceil(s * scale) for s in items[i].shape[:2])
            out[i] = result[:h, :w]
        for i in (i for i, t in enumerate(tiles) if t):
            out[i] = tiled(items[i], i, tiles[i])
        if len({o.shape for o in out}) == 1:
            return np.stack(out)
        return out

    def _batched(self, items: list[np.ndarray], indices: list[int], what: str,
                 step: Callable) -> list[np.ndarray]:
        """`step(batch, indices)` over `items` grouped by shape, in fixed-size batches padded
        with zeros; the outputs in the items' order."""
        groups: dict[tuple, list[int]] = {}
        for k, item in enumerate(items):
            groups.setdefault(item.shape, []).append(k)
        out: list = [None] * len(items)
        b, sharding = self.batch_size, parallel.batch_sharding(self.mesh)
        with progress.bar(len(items), what, quiet=len(items) <= b) as meter:
            for shape, members in groups.items():
                for start in range(0, len(members), b):
                    chunk = members[start:start + b]
                    batch = np.zeros((b, *shape), np.float32)
                    batch[:len(chunk)] = np.stack([items[k] for k in chunk])
                    index = np.full((b,), -1, np.int32)
                    index[:len(chunk)] = [indices[k] for k in chunk]
                    result = np.asarray(step(jax.device_put(batch, sharding),
                                             jax.device_put(index, sharding)))
                    for j, k in enumerate(chunk):
                        out[k] = result[j]
                    meter.update(len(chunk))
        return out


def _pad(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """`x` (H, W, C) padded at the bottom and right to (height, width) by reflection."""
    if (height, width) == x.shape[:2]:
        return x
    return np.pad(x, ((0, height - x.shape[0]), (0, width - x.shape[1]), (0, 0)),
                  mode="reflect")


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


def _moments(model: Autoencoder, params, x):
    posterior = model.encode(params, x)
    return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)


def _velocity(model: Autoencoder, params, x, t, z):
    return model.velocity(params, x, jnp.full((x.shape[0],), t, jnp.float32), z)


def _conv_decode(model: Autoencoder, params, z):
    return model.decode_from_noise(params, z, None)
