"""The latent DiT task: `ldm.LatentDiffusion` on a latent cache, plugged into the shared trainer.

Training batches are normalised latents drawn afresh every epoch from the cache's stored
posteriors (cache/reader.py). Images come from sampling: the EMA DiT draws normalised latents
for given classes, they are un-normalised with the cache's statistics and decoded by the DGAE
whose checkpoint the cache manifest names. Evaluation writes a sample grid and reports gFID of
`eval.fid_samples` samples (classes i mod num_classes) against reference statistics:
`eval.fid_reference` (an `.npz` from `python -m dgae_jax.fid ... --save_stats`), or, when empty,
the statistics of the images the cache was encoded from, computed once into the workdir.
"""

from __future__ import annotations

import functools
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from dgae_jax import checks, ddpm, grids, parallel, pixels, progress, runs
from dgae_jax.autoencoder import Autoencoder
from dgae_jax.cache import reader
from dgae_jax.checks import require
from dgae_jax.data import pipeline, sources
from dgae_jax.errors import ConfigError
from dgae_jax.ldm import OBJECTIVES, LatentDiffusion
from dgae_jax.metrics import frechet, inception_convert
from dgae_jax.metrics.features import FeatureCollector, InceptionFeatures
from dgae_jax.tasks.base import Run
from dgae_jax.tasks.trained import load_autoencoder

LATENT_MODES = ("sample", "mean")  # cache.latent: train on posterior samples or means
# Built from the config alone: no cache is opened.
ABSTRACT_MODES = ("summary", "benchmark", "compile")
EVALUATING_MODES = ("train", "eval")  # the modes that load the FID Inception for gFID


def autoencoder_config(manifest: dict) -> ml_collections.ConfigDict:
    """The config of the autoencoder a cache was made with (its manifest keeps it)."""
    config = ml_collections.ConfigDict(manifest["config"])
    config.eval.rfid = False  # decoding needs no Inception
    return config


def student_config(workdir: str, cache_checkpoint: dict) -> ml_collections.ConfigDict:
    """The config of the distillation run `workdir` (sample.decoder), whose teacher must be the
    checkpoint the cache was encoded with: the student decodes that encoder's latents."""
    _, config = runs.saved_config(workdir)
    teacher = (config.distill.teacher, config.distill.teacher_step) if "distill" in config else None
    wanted = (cache_checkpoint["workdir"], cache_checkpoint["step"])
    if teacher is None or (os.path.abspath(teacher[0]), teacher[1]) != (
            os.path.abspath(wanted[0]), wanted[1]):
        raise ConfigError(f"sample.decoder={workdir!r} is not a student of the cache's "
                          f"autoencoder {wanted[0]} at step {wanted[1]} (its teacher: {teacher})")
    config.eval.rfid = False
    return config


class LatentDiffusionTask:
    frozen = ()  # the DiT trains whole

    def __init__(self, config: ml_collections.ConfigDict, mode: str = "train"):
        """summary, benchmark and compile build the model from config alone; the others open the
        latent cache, and those that evaluate load the FID Inception."""
        self.config = config
        self.model = LatentDiffusion.from_config(config)
        self.cache = self.inception_weights = None
        if mode in ABSTRACT_MODES:
            return
        self.cache = reader.LatentSource(config.cache.dir, "train", verify=config.cache.verify)
        if self.cache.mean is None:
            raise ConfigError(f"latent cache {config.cache.dir} has no train split statistics")
        shape = tuple(self.cache.manifest["latent_shape"])
        if shape != self.model.latent_shape:
            raise ConfigError(f"model.latent_size={config.model.latent_size}, model."
                              f"latent_channels={config.model.latent_channels} do not match the "
                              f"cache's latents {shape}")
        if config.eval.fid_samples and mode in EVALUATING_MODES:
            self.inception_weights = inception_convert.load_or_convert(
                config.eval.inception_weights or None)

    @classmethod
    def complete_config(cls, config: ml_collections.ConfigDict, user_set: dict) -> None:
        """Its config is complete as given."""

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict, mode: str) -> None:
        """The DiT, its diffusion, the latent cache, sampling and evaluation fields."""
        m = config.model
        checks.positive(config, "model.hidden", "model.heads", "model.depth", "model.patch_size",
                        "model.latent_size", "model.latent_channels", "model.num_classes")
        require(m.hidden % m.heads == 0 and (m.hidden // m.heads) % 2 == 0,
                f"model.hidden={m.hidden} does not split into model.heads={m.heads} heads of "
                "even width")
        require(m.latent_size % m.patch_size == 0,
                f"model.patch_size={m.patch_size} does not divide model.latent_size="
                f"{m.latent_size}")
        require(0 <= m.label_dropout < 1,
                f"model.label_dropout={m.label_dropout} is not in [0, 1)")
        checks.one_of(m.dtype, checks.DTYPES, "model.dtype")
        _check_diffusion(config)
        checks.not_negative(config, "diffusion.guidance")
        checks.one_of(config.cache.latent, LATENT_MODES, "cache.latent")
        if mode not in ABSTRACT_MODES:
            require(bool(config.cache.dir), "cache.dir is required: the latent cache written by "
                    "--mode=cache_latents")
            require(os.path.isdir(config.cache.dir) or "://" in config.cache.dir,
                    f"cache.dir={config.cache.dir!r} does not exist")
        s, e = config.sample, config.eval
        bad = [c for c in s.classes if not 0 <= c < m.num_classes]
        require(not bad, f"sample.classes={bad} are outside [0, {m.num_classes}) "
                f"(model.num_classes={m.num_classes})")
        checks.positive(config, "sample.num")
        if s.decoder:
            checks.run_workdir(s.decoder, "sample.decoder")
        checks.not_negative(config, "eval.num_images", "eval.fid_samples")
        checks.optional_step(config, "sample.step", "eval.step")
        if mode in EVALUATING_MODES:
            if e.fid_reference:
                checks.file(e.fid_reference, "eval.fid_reference")
            if e.inception_weights and e.fid_samples:
                checks.file(e.inception_weights, "eval.inception_weights")

    @staticmethod
    def init_params(model: LatentDiffusion, rng: jax.Array):
        return model.init(rng)

    @staticmethod
    def loss_fn(model: LatentDiffusion, params, batch: dict, rng: jax.Array, step: jax.Array):
        return model.loss_fn(params, batch, rng, step)

    def batch_spec(self, batch_size: int) -> dict:
        return {"latent": jax.ShapeDtypeStruct((batch_size, *self.model.latent_shape),
                                               jnp.float32),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                "id": jax.ShapeDtypeStruct((batch_size,), jnp.int64),
                "flipped": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}

    def describe(self, param_totals: dict[str, int]) -> dict:
        m = self.config.model
        return {"dit_params": param_totals["dit"], "latent_shape": list(self.model.latent_shape),
                "patch_size": m.patch_size, "tokens": (m.latent_size // m.patch_size) ** 2,
                "hidden": m.hidden, "depth": m.depth, "heads": m.heads,
                "objective": self.config.diffusion.objective}

    def train_data(self, process_index: int, process_count: int):
        op = reader.SampleLatent(self.cache.mean, self.cache.std, self.config.cache.latent,
                                  self.config.cache.flip)
        ds = grain.MapDataset.source(self.cache).map(
            functools.partial(check_label, num_classes=self.config.model.num_classes))
        return pipeline.epoch_batches(ds, self.config, process_index, process_count, op)

    def pretrained_params(self) -> dict:
        return {}

    def bad_image_log(self, workdir, process_index: int, process_count: int):
        return None  # latents are read from a verified cache

    def evaluator(self, run: Run) -> "LatentDiffusionEvaluator":
        return LatentDiffusionEvaluator(self.config, run, self.cache, self.inception_weights)

    def executables(self, mesh: jax.sharding.Mesh, params) -> dict:
        """The DiT's sampler (diffusion.sample_steps, the configured guidance) on one global
        batch of labels, as evaluation and --mode=sample run it before the autoencoder decodes
        (its decode is the eval_step of the autoencoder's own config)."""
        repl, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        labels = jax.ShapeDtypeStruct((self.config.batch_size,), jnp.int32, sharding=batch)
        rng = parallel.abstract(jax.eval_shape(jax.random.key, 0), repl)
        sample = jax.jit(lambda ldm, p, y, r: ldm.sample(p, y, r), out_shardings=batch)
        return {"eval_step": functools.partial(sample.lower, parallel.abstract(self.model, repl),
                                               params, labels, rng)}

    def benchmark_names(self) -> tuple[str, ...]:
        return ("dit",)  # one DiT forward

    def benchmark_components(self, names, params, mesh: jax.sharding.Mesh, data) -> dict:
        t, labels = data(fill=0.5), data(dtype=np.int32, fill=0)
        latents = data(*self.model.latent_shape)
        return {"dit": (self.model.output, (params, latents, t, labels), None)}


class LatentDiffusionEvaluator:
    """Sampling and gFID for one run: built once, it restores the DGAE named by the cache's
    manifest (EMA parameters only, no LPIPS) onto the run's mesh and jits the generator."""

    def __init__(self, config: ml_collections.ConfigDict, run: Run, cache, inception_weights):
        self.config, self.run, self.cache = config, run, cache
        ckpt = cache.manifest["checkpoint"]
        self.ae_config = autoencoder_config(cache.manifest)
        workdir, step, field = ckpt["workdir"], ckpt["step"], "the cache's step"
        if config.sample.decoder:  # a distilled student of the cache's autoencoder
            self.ae_config = student_config(config.sample.decoder, ckpt)
            workdir, step, field = config.sample.decoder, None, "sample.decoder"
        _, self.ae, self.ae_params = load_autoencoder(
            self.ae_config, workdir, run.mesh, step, field=field)
        self.inception = (None if inception_weights is None
                          else InceptionFeatures(run.mesh, inception_weights))
        mean, std = jnp.asarray(cache.mean), jnp.asarray(cache.std)

        def generate(ldm: LatentDiffusion, params, ae: Autoencoder, ae_params, labels, rng):
            rng_z, rng_x = jax.random.split(rng)
            z = ldm.sample(params, labels, rng_z) * std + mean
            x = jnp.clip(ae.decode(ae_params, z, rng_x), -1.0, 1.0)
            return pixels.to_uint8(x)
        self._generate = jax.jit(generate, out_shardings=parallel.batch_sharding(run.mesh))

    def generate(self, params, labels: np.ndarray, seed: int):
        """uint8 images for `labels` (every process passes the same labels), in batches of
        batch_size; yields (global image batch, global mask) pairs."""
        batch = self.config.batch_size
        with progress.bar(len(labels), "sample", quiet=len(labels) <= batch) as meter:
            for i, start in enumerate(range(0, len(labels), batch)):
                real = labels[start:start + batch]
                padded = np.zeros(batch, np.int32)
                padded[:len(real)] = real
                host = {"label": padded, "mask": np.arange(batch) < len(real)}
                device = parallel.shard_host_batch(host, self.run.mesh)
                rng = jax.random.fold_in(jax.random.key(seed), i)
                yield (self._generate(self.run.model, params, self.ae, self.ae_params,
                                      device["label"], rng), device["mask"])
                meter.update(len(real))

    def sample_labels(self, num: int) -> np.ndarray:
        """`num` labels cycling through sample.classes (all classes when empty)."""
        classes = tuple(self.config.sample.classes) or range(self.config.model.num_classes)
        return np.resize(np.asarray(classes, np.int32), num)

    def write_samples(self, params, step: int, num: int, seed: int) -> np.ndarray:
        """`samples/<step>/grid.png` and `images.npz` (uint8, key arr_0 as ADM's files, plus
        the labels), and the grid in TensorBoard."""
        labels = self.sample_labels(num)
        images = np.concatenate([
            np.asarray(multihost_utils.process_allgather(x, tiled=True))[
                np.asarray(multihost_utils.process_allgather(m, tiled=True))]
            for x, m in self.generate(params, labels, seed)])
        grid = grids.image_grid(images[None])
        self.run.writer.write_images(step, {"samples": grid[None]})
        if self.run.is_lead:
            out = self.run.workdir / "samples" / str(step)
            out.mkdir(parents=True, exist_ok=True)
            grids.save_png(grid, out / "grid.png")
            with (out / "images.npz").open("wb") as f:
                np.savez(f, images, labels=labels)
        return images

    def reference_stats(self) -> dict[str, frechet.FeatureStats]:
        """eval.fid_reference, or the statistics of the cached images (once, in the workdir)."""
        path = self.config.eval.fid_reference
        if path:
            return frechet.load_stats(path)
        cached = self.run.workdir / "fid_reference.npz"
        if cached.exists():
            with cached.open("rb") as f:
                return frechet.load_stats(f)
        ae_config = self.ae_config.copy_and_resolve_references()
        ae_config.batch_size = self.config.batch_size
        collector = FeatureCollector()
        images = sources.cache_source(ae_config, "train")
        for local in pipeline.eval_dataset(ae_config, jax.process_index(), jax.process_count(),
                                           images):
            batch = parallel.global_batch(local, self.run.mesh)
            collector.add(self.inception(batch["image"]), batch["mask"])
        stats = collector.stats()
        if self.run.is_lead:
            with cached.open("wb") as f:
                frechet.save_stats(f, stats)
        return stats

    def evaluate(self, params, step: int) -> dict[str, float]:
        """A sample grid and, with eval.fid_samples > 0, gFID / sFID of that many samples."""
        self.write_samples(params, step, self.config.eval.num_images, self.config.seed)
        n = self.config.eval.fid_samples
        if self.inception is None or not n:
            return {}
        collector = FeatureCollector()
        for images, mask in self.generate(params, self.sample_labels(n), self.config.seed + 1):
            collector.add(self.inception(images), mask)
        scores = frechet.compare(self.reference_stats(), collector.stats())
        return {"gfid": scores["fid"], "gsfid": scores["sfid"], "fid_samples": len(collector)}

    def sample(self, params, step: int) -> dict:
        """`--mode=sample`: sample.num images of sample.classes with sample.seed."""
        s, d = self.config.sample, self.config.diffusion
        images = self.write_samples(params, step, s.num, s.seed)
        return {"step": step, "num": len(images),
                "samples": str(self.run.workdir / "samples" / str(step)),
                "objective": d.objective, "steps": d.sample_steps, "sampler": d.sampler,
                "guidance": d.guidance}


def check_label(example: dict, *, num_classes: int) -> dict:
    """A cached label the DiT has no embedding for is an error, not a silent NaN or clamp."""
    if not 0 <= example["label"] < num_classes:
        raise ValueError(f"latent cache example {example['id']} has label {example['label']}, "
                         f"outside [0, model.num_classes={num_classes})")
    return example


def _check_diffusion(config) -> None:
    """The objective's fields: rectified flow's, or DDPM's schedule and respaced sampling."""
    d = config.diffusion
    checks.one_of(d.objective, OBJECTIVES, "diffusion.objective")
    if d.objective == "rf":
        checks.rectified_flow(config)
        return
    checks.one_of(d.sampler, ddpm.SAMPLERS, "diffusion.sampler")
    checks.one_of(d.spacing, ddpm.SPACINGS, "diffusion.spacing")
    require(d.num_timesteps >= 2, f"diffusion.num_timesteps={d.num_timesteps} must be >= 2")
    scale = 1000 / d.num_timesteps
    require(0 < d.beta_start < d.beta_end and d.beta_end * scale < 1,
            f"diffusion.beta_start={d.beta_start}, beta_end={d.beta_end} must satisfy 0 < start "
            f"< end < {d.num_timesteps / 1000} (num_timesteps / 1000)")
    require(2 <= d.sample_steps <= d.num_timesteps,
            f"diffusion.sample_steps={d.sample_steps} is not in [2, diffusion.num_timesteps="
            f"{d.num_timesteps}]")
