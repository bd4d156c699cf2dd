"""What each `--mode` does, as functions of (config, workdir, task); `main.py` dispatches here.

    train          train, resuming from the latest checkpoint in --workdir
    eval           evaluate the EMA parameters of the latest (or eval.step) checkpoint
    sample         (ldm) draw and decode samples into <workdir>/samples/<step>/
    cache_latents  (autoencoder) encode the data once into cache.dir
    summary        parameter table, latent shape and train-step FLOPs, without allocating
    benchmark      time the train step on synthetic batches
    sweep          (autoencoder, diffusion decoder) eval's metrics at every decode setting of a grid
    reconstruct    (autoencoder) reconstructions and metrics of your images (reconstruct.py)
    export         (autoencoder) an inference bundle, or diffusers' AutoencoderKL (export.py)
Every mode but train returns a JSON-able record, which the CLI prints as its last line.
"""

from __future__ import annotations

import jax
import ml_collections

from dgae_jax import benchmark as benchmark_lib
from dgae_jax import checkpoint, export as export_lib, inference, parallel
from dgae_jax import reconstruct as reconstruct_lib, summary as summary_lib, sweep as sweep_lib
from dgae_jax import trainer
from dgae_jax.cache import benchmark as cache_benchmark, job as cache_job
from dgae_jax.metrics import lpips
from dgae_jax.tasks.base import Run, Task, make_writer


def train(config: ml_collections.ConfigDict, workdir: str, task: Task) -> None:
    trainer.train_and_evaluate(config, workdir, task)


def _restored_run(config, workdir: str, task: Task, step: int | None, field: str):
    """The run of a saved workdir on the config's mesh, and its EMA parameters of `step`."""
    workdir = checkpoint.run_directory(workdir)
    mesh = parallel.make_mesh(config.mesh)
    model = jax.device_put(task.model, parallel.replicated(mesh))
    step, ema = inference.restore_ema(config, workdir, task.init_params, task.model, mesh, step,
                                      field)
    return Run(config, workdir, mesh, model, make_writer(workdir)), step, ema


def evaluate(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
    """The task's evaluation of a saved run's EMA parameters, also written to eval/<step>.json."""
    run, step, ema = _restored_run(config, workdir, task, config.eval.step, "eval.step")
    results = task.evaluator(run).evaluate(ema, step)
    run.write_eval(step, results)
    run.writer.flush()
    return {"step": step, **results}


def sample(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
    """The task's samples from a saved run's EMA parameters."""
    run, step, ema = _restored_run(config, workdir, task, config.sample.step, "sample.step")
    record = task.evaluator(run).sample(ema, step)
    run.writer.flush()
    return record


def sweep(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
    """The evaluation of a saved run's EMA autoencoder (latest, or eval.step) at every setting of
    eval.sweep_steps x eval.sweep_samplers x eval.sweep_spacings: PSNR, SSIM, LPIPS, rFID (with
    eval.rfid), network evaluations (NFE) and seconds per image (of the reconstruction step,
    over every batch but the first, which compiles) of each, in <workdir>/eval/sweep-<step>.json
    and plotted against NFE in sweep-<step>.png. Process 0 writes; every process computes.

    Choose the setting on a split other than the one you report, so the choice does not fit the
    reported images: sweep on a different validation subset or a held-out part of the training
    data (`--config.data.eval_split=... --config.data.eval_subset=...`), then report with
    `--mode=eval --config.diffusion.sample_steps=N --config.diffusion.sampler=S
    --config.diffusion.spacing=T` on the reported split.
    """
    run, step, ema = _restored_run(config, workdir, task, config.eval.step, "eval.step")
    record = sweep_lib.sweep(run, task.evaluator(run), ema, step)
    run.writer.flush()
    return record


def reconstruct(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
    """reconstruct.input through a saved run, into reconstruct.output."""
    weights = task.model.lpips_weights
    if weights is None:  # the run's loss has no LPIPS term; the metric still uses its net
        weights = lpips.load_weights(config.loss.lpips_net)
    return reconstruct_lib.reconstruct(config, workdir, weights)


def export(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
    """A saved run's EMA autoencoder in export.dir."""
    return export_lib.export(config, workdir)


def cache_latents(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
    """The cache in `cache.dir`, or with `cache.benchmark`, the caching throughput."""
    if config.cache.benchmark:
        return cache_benchmark.benchmark(config, workdir, task)
    return cache_job.cache_latents(config, workdir, task)


def summary(config: ml_collections.ConfigDict, workdir: str | None, task: Task) -> dict:
    return summary_lib.summarize(config, task)


def benchmark(config: ml_collections.ConfigDict, workdir: str | None, task: Task) -> dict:
    return benchmark_lib.benchmark(config, task)


MODES = {"train": train, "eval": evaluate, "sample": sample, "cache_latents": cache_latents,
         "summary": summary, "benchmark": benchmark, "sweep": sweep,
         "reconstruct": reconstruct, "export": export}
