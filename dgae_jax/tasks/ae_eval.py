"""The autoencoder's evaluation: PSNR, SSIM (on uint8-rounded images, the usual convention), LPIPS
when the LPIPS term is enabled, and rFID (FID of the reconstructions against the inputs, FID
Inception features) when `eval.rfid` is on, of the EMA parameters' reconstructions of the whole
evaluation set at the configured decode settings; it also writes an input | reconstruction grid
to TensorBoard and `<workdir>/images/<step>.png`. `--mode=sweep` calls the same evaluation with
decode settings other than the config's.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from dgae_jax import grids, parallel, pixels, progress
from dgae_jax.autoencoder import Autoencoder
from dgae_jax.data import pipeline, sources
from dgae_jax.metrics import frechet, image as image_metrics, lpips
from dgae_jax.metrics.bootstrap import bootstrap_std
from dgae_jax.metrics.features import FeatureCollector, InceptionFeatures
from dgae_jax.tasks.base import Run


class AutoencoderEvaluator:
    """PSNR / SSIM / LPIPS / rFID of EMA reconstructions over the whole evaluation set; built once
    per run (the jitted reconstruction step and the Inception network on the run's mesh).

    The reconstruction step is `eval_step`, one `jax.jit` with the decode settings (steps,
    sampler, spacing) as static arguments: it compiles once per setting (the first batch of an
    evaluation at a new setting), and later evaluations at a setting already seen reuse it.
    """

    def __init__(self, config: ml_collections.ConfigDict, run: Run, inception_weights):
        self.config, self.run = config, run
        self.inception = (None if inception_weights is None
                          else InceptionFeatures(run.mesh, inception_weights))
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
        decode = run.model.decode_settings(steps, sampler, spacing)
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
            recon, values = eval_step(run.model, params, batch, rng, **decode)
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
        results.update(run.model.decode_record(**decode))
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


@functools.partial(jax.jit, static_argnames=("steps", "sampler", "spacing"))
def eval_step(model: Autoencoder, params, batch: dict, rng: jax.Array,
              steps: int | None = None, sampler: str | None = None, spacing: str | None = None):
    """Reconstructs a batch; returns it (uint8) with its per-image metrics. The decode settings
    are static under jit (None: the config's; the conv decoder ignores them)."""
    x = pixels.to_signed(batch["image"])
    x_hat = jnp.clip(model.reconstruct(params, x, rng, steps=steps, sampler=sampler,
                                       spacing=spacing), -1.0, 1.0)
    real, fake = pixels.to_uint8_range(x), pixels.to_uint8_range(x_hat)
    values = {"psnr": image_metrics.psnr(real, fake), "ssim": image_metrics.ssim(real, fake)}
    if model.lpips_weights is not None:
        values["lpips"] = lpips.lpips_distance(model.lpips_weights, x_hat, x,
                                               net=model.config.loss.lpips_net)
    return fake.astype(jnp.uint8), values
