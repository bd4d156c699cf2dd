"""The autoencoder task: DGAE (or the SD-VAE baseline) plugged into the shared trainer.

Batches arrive as uint8 images and are mapped to [-1, 1] on the device (pixels.py). Evaluation
is `ae_eval.AutoencoderEvaluator`'s. The task also owns its config checks, its benchmark
components (encoder, U-Net, whole decodes, the conv decoder at the same latent shape), the decode
settings `--mode=sweep` evaluates, and how a trained run loads for inference.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dgae_jax import checks, diffusers_io, diffusion, parallel, pixels, runs
from dgae_jax.autoencoder import Autoencoder
from dgae_jax.checks import require
from dgae_jax.data import bad_images, pipeline, sources
from dgae_jax.metrics import inception_convert, lpips
from dgae_jax.models.unet import ADM_CHANNEL_MULT, REMAT
from dgae_jax.costs import hlo_flops
from dgae_jax.tasks.ae_eval import AutoencoderEvaluator, eval_step
from dgae_jax.tasks import encoder_source
from dgae_jax.tasks.base import Run

EVALUATING_MODES = ("train", "eval", "sweep")  # the modes that load the FID Inception for rFID


class AutoencoderTask:
    def __init__(self, config: ml_collections.ConfigDict, mode: str = "train"):
        """Loads what `mode` needs: LPIPS (a loss term and an evaluation metric) for all but
        caching and export, the FID Inception only for the modes that evaluate."""
        self.config = config
        self.model = Autoencoder.from_config(config,
                                             with_lpips=mode not in ("cache_latents", "export"))
        self.frozen = ("encoder",) if self.model.frozen_encoder else ()
        # Loaded now so that missing weights stop the run at start, not at the first eval.
        evaluates = config.eval.rfid and mode in EVALUATING_MODES
        self.inception_weights = (inception_convert.load_or_convert(
            config.eval.inception_weights or None) if evaluates else None)

    @classmethod
    def complete_config(cls, config: ml_collections.ConfigDict, user_set: dict) -> None:
        """With init.encoder_from: checks that the source's encoder is this config's (a run's
        config is read through Orbax, so here, once the runtime is up) and, unless given, takes
        model.scaling_factor from it when it declares one."""
        source = config.init.encoder_from
        if not source:
            return
        encoder_source.check(source, config)
        if config.model.get("scaling_factor") is None:
            config.model.scaling_factor = encoder_source.scaling_factor(source)

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict, mode: str) -> None:
        """The model, loss, data and evaluation fields; the init.*_from directories (train)."""
        _check_model(config)
        _check_data(config)
        e = config.eval
        checks.not_negative(config, "eval.num_images")
        checks.optional_step(config, "eval.step")
        if mode in EVALUATING_MODES and e.rfid and e.inception_weights:
            checks.file(e.inception_weights, "eval.inception_weights")
        if mode == "train":
            _check_init(config)

    @classmethod
    def load_trained(cls, config: ml_collections.ConfigDict, workdir: str,
                     mesh: jax.sharding.Mesh, step: int | None = None,
                     field: str = "eval.step") -> tuple[int, Autoencoder, dict]:
        """(step, Autoencoder without LPIPS weights, EMA parameters on `mesh`) of a trained run:
        all that encoding and decoding need."""
        model = Autoencoder.from_config(config, with_lpips=False)
        step, ema = runs.restore_ema(config, workdir, Autoencoder.init, model, mesh, step, field)
        return step, model, ema

    @staticmethod
    def init_params(model: Autoencoder, rng: jax.Array):
        return model.init(rng)

    @staticmethod
    def loss_fn(model: Autoencoder, params, batch: dict, rng: jax.Array, step: jax.Array):
        return model.loss_fn(params, {"image": pixels.to_signed(batch["image"])}, rng, step)

    def train_data(self, process_index: int, process_count: int):
        self._train_source = sources.make_source(self.config, "train")
        return pipeline.train_dataset(self.config, process_index, process_count,
                                      self._train_source)

    def pretrained_params(self) -> dict:
        """The modules init.encoder_from (a diffusers directory, a run or a bundle) and
        init.decoder_from (a diffusers directory) name, checked at start-up, read now."""
        init, loaded = self.config.init, {}
        if init.encoder_from:
            loaded["encoder"] = encoder_source.load(init.encoder_from, self.config)
            logging.info("the encoder %s from %s", "is frozen, loaded" if self.frozen
                         else "starts", init.encoder_from)
        if init.decoder_from:
            loaded.update(diffusers_io.load_params(init.decoder_from, self.config, ("decoder",),
                                                   field="init.decoder_from"))
            logging.info("the decoder starts from the AutoencoderKL in %s", init.decoder_from)
        return loaded

    def bad_image_log(self, workdir, process_index: int, process_count: int):
        """The record of replaced training images (data.bad_images='skip'): one file per
        process, the limit checked on the count over processes."""
        data = self.config.data
        if data.bad_images != "skip":
            return None
        name = ("bad_images.txt" if process_count == 1
                else f"bad_images.{process_index}-of-{process_count}.txt")
        count_all = (None if process_count == 1 else lambda n: int(np.sum(
            multihost_utils.process_allgather(np.int64(n)))))
        return bad_images.BadImageLog(workdir / name, len(self._train_source),
                                      data.max_bad_fraction, count_all)

    def batch_spec(self, batch_size: int) -> dict:
        size = self.config.image_size
        return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                "id": jax.ShapeDtypeStruct((batch_size,), jnp.int64)}

    def describe(self, param_totals: dict[str, int]) -> dict:
        """The summary's model-specific fields."""
        shape = self.model.latent_shape
        return {"decoder_type": self.config.model.decoder, "image_size": self.config.image_size,
                "encoder_params": param_totals["encoder"],
                "decoder_params": param_totals["decoder"],
                "discriminator_params": param_totals.get("discriminator", 0),
                "latent_shape": list(shape), "latent_size": int(np.prod(shape))}

    def evaluator(self, run: Run) -> AutoencoderEvaluator:
        return AutoencoderEvaluator(self.config, run, self.inception_weights)

    def sweep_settings(self) -> list[dict]:
        """eval.sweep_samplers x eval.sweep_spacings x eval.sweep_steps, grouped by sampler x
        spacing (one plotted line each), steps as configured."""
        e = self.config.eval
        return [{"steps": int(n), "sampler": sampler, "spacing": spacing}
                for sampler in e.sweep_samplers for spacing in e.sweep_spacings
                for n in e.sweep_steps]

    def executables(self, mesh: jax.sharding.Mesh, params) -> dict:
        """The evaluation's reconstruction step (decode at the config's setting, PSNR, SSIM,
        LPIPS) on one global batch."""
        return eval_executable(self.config, self.model, mesh, params)

    # ----------------------------------------------------------------------------- benchmark
    def benchmark_names(self) -> tuple[str, ...]:
        """encoder, then (DGAE) one U-Net forward and whole decodes of benchmark.decode_steps
        steps, then the SD-VAE baseline's decoder at the same latent shape."""
        decodes = (("unet", *(f"decode_{n}" for n in self.config.benchmark.decode_steps))
                   if self.config.model.decoder == "diffusion" else ())
        return ("encoder", *decodes, "conv_decoder")

    def benchmark_components(self, names, params, mesh: jax.sharding.Mesh, data) -> dict:
        """A decode's FLOPs are its U-Net evaluations times one U-Net's (lowered, not
        compiled): XLA counts a loop body once. The conv decoder of a DGAE config gets fresh
        parameters."""
        config, model = self.config, self.model
        key = jax.device_put(jax.random.key(0), parallel.replicated(mesh))
        t = data(fill=0.5)
        x, z = data(config.image_size, config.image_size, 3), data(*model.latent_shape)
        out = {"encoder": (lambda p, x: model.encode(p, x).mean, (params, x), None),
               "unet": (model.velocity, (params, x, t, z), None)}
        if any(n.startswith("decode_") for n in names):
            unet_flops = hlo_flops(jax.jit(model.velocity).lower(params, x, t, z))
            for steps in config.benchmark.decode_steps:
                out[f"decode_{steps}"] = (
                    lambda p, z, k, s=steps: model.decode(p, z, k, steps=s), (params, z, key),
                    diffusion.nfe(steps, config.diffusion.sampler) * unet_flops)
        if "conv_decoder" in names:
            conv_config = ml_collections.ConfigDict(config.to_dict())
            conv_config.model.decoder, conv_config.loss.gan_weight = "conv", 0.0
            conv = Autoencoder.from_config(conv_config, with_lpips=False)
            conv_params = (params if config.model.decoder == "conv" else
                           jax.jit(conv.init, out_shardings=parallel.replicated(mesh))(key))
            out["conv_decoder"] = (lambda p, z, k: conv.decode(p, z, k), (conv_params, z, key),
                                   None)
        return {name: out[name] for name in names}


def eval_executable(config, model: Autoencoder, mesh: jax.sharding.Mesh, params) -> dict:
    """{'eval_step': lowers `ae_eval.eval_step` of `model` for one global batch on `mesh`}."""
    size, repl = config.image_size, parallel.replicated(mesh)
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.uint8,
                                           sharding=parallel.batch_sharding(mesh))}
    rng = parallel.abstract(jax.eval_shape(jax.random.key, 0), repl)
    return {"eval_step": functools.partial(eval_step.lower, parallel.abstract(model, repl),
                                           params, batch, rng)}


# ------------------------------------------------------------------------------- config checks
def _check_model(config) -> None:
    m = config.model
    f = 2 ** (len(m.encoder.channel_mult) - 1)
    require(f == m.spatial_factor,
            f"model.encoder.channel_mult has {len(m.encoder.channel_mult)} levels, a factor of "
            f"{f}, but model.spatial_factor is {m.spatial_factor}")
    require(config.image_size % f == 0,
            f"image_size={config.image_size} is not divisible by the spatial factor {f}")
    checks.positive(config, "image_size", "model.latent_channels", "model.norm_groups")
    checks.one_of(m.decoder, ("diffusion", "conv"), "model.decoder")
    checks.one_of(m.dtype, checks.DTYPES, "model.dtype")
    if m.decoder == "diffusion":
        mult = tuple(m.unet.channel_mult) or ADM_CHANNEL_MULT.get(config.image_size)
        require(mult is not None, f"model.unet.channel_mult is empty and ADM has no default for "
                f"image_size={config.image_size}; set it explicitly")
        require(config.image_size % 2 ** (len(mult) - 1) == 0,
                f"image_size={config.image_size} is not divisible by the U-Net's "
                f"{len(mult) - 1} downsamplings (model.unet.channel_mult)")
        checks.one_of(m.unet.remat, REMAT, "model.unet.remat")
        require(m.unet.attention in (None, "xla", "cudnn"),
                f"model.unet.attention={m.unet.attention!r} is not None, 'xla' or 'cudnn'")
        checks.rectified_flow(config)
    checks.not_negative(config, *(f"loss.{w}" for w in ("velocity_weight", "kl_weight",
                                                        "lpips_weight", "l1_weight",
                                                        "gan_weight")))
    checks.one_of(config.loss.lpips_net, lpips.NETS, "loss.lpips_net")
    checks.one_of(config.loss.get("latents", "sample"), ("sample", "mean"), "loss.latents")
    factor = m.get("scaling_factor")
    require(factor is None or factor > 0, f"model.scaling_factor={factor} is not positive")


def _check_data(config) -> None:
    d = config.data
    name = d.name
    require(name in ("embedded", "folder") or (isinstance(name, str) and name.startswith("tfds:")
                                               and len(name) > len("tfds:")),
            f"unknown data.name={name!r}; expected 'embedded', 'folder' or "
            "'tfds:<tfds dataset name>' (e.g. 'tfds:imagenet2012')")
    if name == "folder":
        require(bool(d.dir), "data.name='folder' needs data.dir (the folder holding the splits)")
        require(os.path.isdir(d.dir) or "://" in d.dir,
                f"data.dir={d.dir!r} does not exist or is not a directory")
    checks.one_of(d.crop, pipeline.CROPS, "data.crop")
    checks.one_of(d.bad_images, bad_images.POLICIES, "data.bad_images")
    require(0 <= d.max_bad_fraction <= 1,
            f"data.max_bad_fraction={d.max_bad_fraction} is not in [0, 1]")
    require(0 < d.min_scale <= 1, f"data.min_scale={d.min_scale} is not in (0, 1]")
    checks.not_negative(config, "data.eval_size")
    require(d.get("eval_crops", 8) >= 1, f"data.eval_crops={d.get('eval_crops')} must be >= 1")
    if d.eval_subset:
        path = sources.NAMED_SUBSETS.get(d.eval_subset, d.eval_subset)
        require(os.path.isfile(path), f"data.eval_subset={d.eval_subset!r} is neither one of "
                f"{sorted(sources.NAMED_SUBSETS)} nor a file of file names")


def _check_init(config) -> None:
    """init.*_from: sources whose architecture is this config's; a frozen encoder's source."""
    i = config.init
    require(bool(i.encoder_from) or not i.freeze_encoder,
            "init.freeze_encoder=True needs init.encoder_from: a diffusers AutoencoderKL "
            "directory (e.g. SD's sd-vae-ft-mse), one of our autoencoder runs or a bundle")
    if i.encoder_from:
        encoder_source.check_path(i.encoder_from, config)
    if i.decoder_from:
        require(config.model.decoder == "conv", "init.decoder_from needs model.decoder='conv' "
                "(the SD-VAE decoder); DGAE's diffusion decoder trains from scratch")
        diffusers_io.check_compatible(i.decoder_from, config, ("decoder",), "init.decoder_from")
