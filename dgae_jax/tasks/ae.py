"""The autoencoder task: DGAE (or the SD-VAE baseline) plugged into the shared trainer.

Batches arrive as uint8 images and are mapped to [-1, 1] on the device (4x less host-to-device
traffic than float32). Evaluation reconstructs a fixed evaluation set with the EMA parameters at
the configured decode steps and sampler and reports PSNR, SSIM (on uint8-rounded images, the
usual convention), LPIPS when the LPIPS term is enabled, and rFID (FID of the reconstructions
against the inputs, FID Inception features) when `eval.rfid` is on; it also writes an input |
reconstruction grid to TensorBoard and `<workdir>/images/<step>.png`. `--mode=sweep`
(`sweep.py`) calls the same evaluation with decode settings other than the config's.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dgae_jax import diffusers_io, grids, parallel, progress
from dgae_jax.autoencoder import Autoencoder
from dgae_jax.data import bad_images, pipeline, sources
from dgae_jax.metrics import frechet, image as image_metrics, inception_convert, lpips
from dgae_jax.metrics.bootstrap import bootstrap_std
from dgae_jax.metrics.features import FeatureCollector, InceptionFeatures
from dgae_jax.tasks.base import Run


def to_signed(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


class AutoencoderTask:
    modes = ("train", "eval", "summary", "benchmark", "cache_latents", "sweep", "reconstruct",
             "export")

    def __init__(self, config: ml_collections.ConfigDict, mode: str = "train"):
        """Loads what `mode` needs: LPIPS (a loss term and an evaluation metric) for all but
        caching, the FID Inception only for the modes that evaluate."""
        self.config = config
        self.model = Autoencoder.from_config(config,
                                             with_lpips=mode not in ("cache_latents", "export"))
        # Loaded now so that missing weights stop the run at start, not at the first eval.
        evaluates = config.eval.rfid and mode in ("train", "eval", "sweep")
        self.inception_weights = (inception_convert.load_or_convert(
            config.eval.inception_weights or None) if evaluates else None)

    @staticmethod
    def init_params(model: Autoencoder, rng: jax.Array):
        return model.init(rng)

    @staticmethod
    def loss_fn(model: Autoencoder, params, batch: dict, rng: jax.Array, step: jax.Array):
        return model.loss_fn(params, {"image": to_signed(batch["image"])}, rng, step)

    def train_data(self, process_index: int, process_count: int):
        self._train_source = sources.make_source(self.config, "train")
        return pipeline.train_dataset(self.config, process_index, process_count,
                                      self._train_source)

    def pretrained_params(self) -> dict:
        """The modules init.encoder_from / init.decoder_from name (diffusers AutoencoderKL
        directories, checked at start-up), read now."""
        loaded = {}
        for module in ("encoder", "decoder"):
            path = self.config.init[f"{module}_from"]
            if path:
                loaded.update(diffusers_io.load_params(path, self.config, (module,),
                                                       field=f"init.{module}_from"))
                logging.info("the %s starts from the AutoencoderKL in %s", module, path)
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

    def evaluator(self, run: Run) -> "AutoencoderEvaluator":
        return AutoencoderEvaluator(self.config, run, self.inception_weights)


def decode_settings(config: ml_collections.ConfigDict, steps: int | None = None,
                    sampler: str | None = None, spacing: str | None = None) -> dict:
    """How reconstructions are decoded: the config's diffusion fields, each replaced by its
    argument when given; recorded next to the metrics. The conv baseline takes none."""
    if config.model.decoder != "diffusion":
        if (steps, sampler, spacing) != (None, None, None):
            raise ValueError("the conv decoder (model.decoder='conv') has no decode settings")
        return {"decode_steps": 1}
    d = config.diffusion
    return {"decode_steps": d.sample_steps if steps is None else steps,
            "sampler": sampler or d.sampler, "spacing": spacing or d.spacing}


class AutoencoderEvaluator:
    """PSNR / SSIM / LPIPS / rFID of EMA reconstructions over the whole evaluation set; built once
    per run (the jitted reconstruction step and the Inception network on the run's mesh).

    The reconstruction step is one `jax.jit` with the decode settings (steps, sampler, spacing)
    as static arguments, made here once: it compiles once per setting (the first batch of an
    evaluation at a new setting), and later evaluations at a setting already seen reuse it.
    """

    def __init__(self, config: ml_collections.ConfigDict, run: Run, inception_weights):
        self.config, self.run = config, run
        self.inception = (None if inception_weights is None
                          else InceptionFeatures(run.mesh, inception_weights))
        self._step = jax.jit(_eval_step, static_argnames=("steps", "sampler", "spacing"))
        self.num_images = pipeline.eval_size(config, sources.make_source(config, "eval"))

    def evaluate(self, params, step: int, *, steps: int | None = None, sampler: str | None = None,
                 spacing: str | None = None, grid: bool = True,
                 timed: bool = False) -> dict:
        """The metrics of `params`' reconstructions of the evaluation set.

        `steps`, `sampler`, `spacing` replace the config's diffusion fields (DGAE only). `grid`:
        write the input | reconstruction grid. `timed`: also `seconds_per_image`, the wall time
        of the jitted reconstruction step (decode plus PSNR / SSIM / LPIPS, waited for batch by
        batch) per image slot of every batch but the first, which compiles and is left out; data
        loading and rFID's Inception features are not counted; None when there is only one
        batch. Every process computes and returns the same metrics (its own timing).
        """
        run, config = self.run, self.config
        settings = decode_settings(config, steps, sampler, spacing)
        decode = ({} if config.model.decoder != "diffusion" else
                  {"steps": settings["decode_steps"], "sampler": settings["sampler"],
                   "spacing": settings["spacing"]})
        per_image, shown = [], []
        seconds, timed_batches = 0.0, 0
        features = {"real": FeatureCollector(), "recon": FeatureCollector()}
        data = pipeline.eval_dataset(config, jax.process_index(), jax.process_count())
        unreadable = 0
        meter = progress.bar(self.num_images, "eval", quiet=self.num_images <= config.batch_size)
        for i, local in enumerate(data):
            unreadable += int(np.sum(local["unreadable"]))
            batch = parallel.global_batch(local, run.mesh)
            rng = jax.random.fold_in(jax.random.key(config.seed), i)
            start = time.perf_counter()
            recon, values = self._step(run.model, params, batch, rng, **decode)
            if timed:
                jax.block_until_ready((recon, values))
                if i > 0:
                    seconds += time.perf_counter() - start
                    timed_batches += 1
            per_image.append((values, batch["mask"]))
            if self.inception is not None:
                for name, images in (("real", batch["image"]), ("recon", recon)):
                    features[name].add(self.inception(images), batch["mask"])
            if timed:
                jax.block_until_ready(per_image)  # the next batch's timing starts on an idle device
            if grid and len(shown) * config.batch_size < config.eval.num_images:
                shown.append((batch["image"], recon, batch["mask"]))
            meter.update(min(config.batch_size, self.num_images - meter.n))
        meter.close()
        values = _real_examples(per_image)
        results = {k: float(np.mean(v)) for k, v in values.items()}
        if self.inception is not None:
            results["rfid"] = frechet.compare(features["real"].stats(),
                                              features["recon"].stats())["fid"]
        results["num_images"] = len(values["psnr"])
        # The spread of each mean over the choice of evaluation images (not over training).
        results["bootstrap_std"] = {k: bootstrap_std(v) for k, v in values.items()}
        results["unreadable_images"] = (unreadable if jax.process_count() == 1 else int(
            np.sum(multihost_utils.process_allgather(np.int64(unreadable)))))
        results.update(settings)
        if timed:
            results["seconds_per_image"] = (seconds / (timed_batches * config.batch_size)
                                            if timed_batches else None)
        if grid:
            self._write_grid(step, shown)
        return results

    def _write_grid(self, step: int, shown: list) -> None:
        """The first `eval.num_images` evaluation images over their reconstructions."""
        if not shown:
            return
        inputs, recon, mask = (
            np.concatenate([np.asarray(multihost_utils.process_allgather(a, tiled=True))
                            for a in arrays]) for arrays in zip(*shown))
        real = np.flatnonzero(mask)[:self.config.eval.num_images]
        grid = grids.image_grid(np.stack([inputs[real], recon[real]]))
        self.run.writer.write_images(step, {"reconstructions": grid[None]})
        if self.run.is_lead:
            grids.save_png(grid, self.run.workdir / "images" / f"{self.run.eval_name(step)}.png")


def _real_examples(per_image: list) -> dict[str, np.ndarray]:
    """Every process's per-image metrics of the (values, mask) batches, padding dropped: a few
    floats per image, gathered once at the end of an evaluation."""
    gathered = multihost_utils.process_allgather(per_image, tiled=True)
    real = np.concatenate([mask for _, mask in gathered]).astype(bool)
    return {k: np.concatenate([v[k] for v, _ in gathered])[real] for k in gathered[0][0]}


def _eval_step(model: Autoencoder, params, batch: dict, rng: jax.Array,
               steps: int | None = None, sampler: str | None = None, spacing: str | None = None):
    """Reconstructs a batch; returns it (uint8) with its per-image metrics. The decode settings
    are static under jit (None: the config's; the conv decoder ignores them)."""
    x = to_signed(batch["image"])
    x_hat = jnp.clip(model.reconstruct(params, x, rng, steps=steps, sampler=sampler,
                                       spacing=spacing), -1.0, 1.0)
    real, fake = image_metrics.to_uint8_range(x), image_metrics.to_uint8_range(x_hat)
    values = {"psnr": image_metrics.psnr(real, fake), "ssim": image_metrics.ssim(real, fake)}
    if model.lpips_weights is not None:
        values["lpips"] = lpips.lpips_distance(model.lpips_weights, x_hat, x,
                                               net=model.config.loss.lpips_net)
    return fake.astype(jnp.uint8), values
