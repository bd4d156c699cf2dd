"""`--mode=eval`: the task's evaluation of a saved run's EMA parameters (the newest intact
checkpoint, or eval.step), also written to <workdir>/eval/<step>.json."""

from __future__ import annotations

import ml_collections

from dgae_jax.modes.base import ALL_TASKS, Mode, restored_run
from dgae_jax.tasks.base import Task


def evaluate(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
    run, step, ema = restored_run(config, workdir, task, config.eval.step, "eval.step")
    results = task.evaluator(run).evaluate(ema, step)
    run.write_eval(step, results)
    run.writer.flush()
    return {"step": step, **results}


MODE = Mode(evaluate, ALL_TASKS)
