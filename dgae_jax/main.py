"""Entry point: `python -m dgae_jax.main --config=configs/f16.py[:variants] --workdir=DIR`.

Only flags, config loading and dispatch live here; each mode is an importable function.
    train    (default) train, resuming from the latest checkpoint in --workdir
    eval     evaluate the latest (or --config.eval.step) checkpoint; prints one JSON line last
    summary  parameter table, latent shape and train-step FLOPs; prints one JSON line last
    benchmark  time the train step on synthetic batches; prints one JSON line last
    cache_latents  encode the data once into --config.cache.dir (latent_cache.py); prints one
             JSON line last
    sample   (task=ldm) draw and decode samples into <workdir>/samples/<step>/; prints one JSON
             line last
"""

from __future__ import annotations

import json
import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dgae_jax import parallel
from dgae_jax.config_lib import ConfigError

MODES = ("train", "eval", "summary", "benchmark", "cache_latents", "sample")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/f16.py or configs/f16.py:demo,c=8.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, images).")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")


def hide_accelerators_from_tensorflow() -> None:
    """clu's TensorBoard writer imports TensorFlow; keep it off the GPUs/TPUs JAX uses."""
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")


def quiet_library_logs() -> None:
    """Orbax and grain log every save and read at INFO; keep their warnings only."""
    noisy = ("/orbax/", "/grain/", "/tensorstore/")
    logging.get_absl_logger().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or not any(n in r.pathname for n in noisy))


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()
    try:
        run(_CONFIG.value, _MODE.value, _WORKDIR.value)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


# The modes each task supports, and whether they evaluate (need the Inception weights).
TASK_MODES = {"autoencoder": ("train", "eval", "summary", "benchmark", "cache_latents"),
              "ldm": ("train", "eval", "summary", "benchmark", "sample")}
EVALUATING = ("train", "eval")


def make_task(config, mode: str):
    """The Task of `config.task` set up for `mode`."""
    if config.task not in TASK_MODES:
        raise ConfigError(f"task={config.task!r} is not one of {', '.join(TASK_MODES)}")
    if mode not in TASK_MODES[config.task]:
        raise ConfigError(f"--mode={mode} does not apply to task={config.task!r} (its modes: "
                          f"{', '.join(TASK_MODES[config.task])})")
    if config.task == "autoencoder":
        from dgae_jax.tasks.ae import AutoencoderTask
        return AutoencoderTask(config, with_inception=mode in EVALUATING)
    from dgae_jax.tasks.ldm import LatentDiffusionTask
    return LatentDiffusionTask(config, with_cache=mode not in ("summary", "benchmark"),
                               with_inception=mode in EVALUATING)


def run(config, mode: str, workdir: str | None) -> None:
    if mode == "summary":
        from dgae_jax import summary
        summary.summarize(config, make_task(config, mode))
        return
    parallel.initialize_distributed()
    task = make_task(config, mode)
    if mode == "benchmark":
        from dgae_jax import benchmark
        benchmark.benchmark(config, task)
        return
    if not workdir:
        raise app.UsageError(f"--workdir is required for --mode={mode}")
    hide_accelerators_from_tensorflow()
    from dgae_jax import trainer
    if mode == "train":
        trainer.train_and_evaluate(config, workdir, task)
    elif mode == "cache_latents":
        from dgae_jax import latent_cache
        print(json.dumps(latent_cache.cache_latents(config, workdir, task)))
    elif mode == "sample":
        print(json.dumps(trainer.sample_checkpoint(config, workdir, task, config.sample.step)))
    else:
        print(json.dumps(trainer.evaluate_checkpoint(config, workdir, task, config.eval.step)))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
