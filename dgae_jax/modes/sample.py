"""`--mode=sample`: the latent DiT's samples from a saved run's EMA parameters (the newest intact
checkpoint, or sample.step), decoded into <workdir>/samples/<step>/."""

from __future__ import annotations

import ml_collections

from dgae_jax.modes.base import Mode, restored_run
from dgae_jax.tasks.base import Task


def sample(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
    run, step, ema = restored_run(config, workdir, task, config.sample.step, "sample.step")
    record = task.evaluator(run).sample(ema, step)
    run.writer.flush()
    return record


MODE = Mode(sample, ("ldm",))
