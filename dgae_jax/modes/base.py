"""What a mode is (`Mode`: what it runs and what it needs), and the restored run that eval, sample
and sweep start from."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import ml_collections

from dgae_jax import checkpoint, parallel, runs
from dgae_jax.tasks.base import Run, Task, make_writer

ALL_TASKS = ("autoencoder", "distill", "ldm")
AUTOENCODER_TASKS = ("autoencoder", "distill")


@dataclasses.dataclass(frozen=True)
class Mode:
    """One `--mode`. What it needs is judged at start-up (validation.py), before any work.

    `run` takes the config, then the workdir if `workdir`, then the task built for this mode if
    `uses_task`, and returns a JSON-able record (None for train). `check(config, device_count)`
    judges the config section the mode owns; `device_count` is None until the devices are
    known: the job's, once the distributed runtime is up, or those of `target(config)`, a mode
    that compiles for devices it does not run on. A mode with neither `cluster` nor `target`
    works on one local device, abstractly.
    """

    run: Callable
    tasks: tuple[str, ...]  # the config.task values it serves
    workdir: bool = True  # reads a trained run in --workdir or writes into it (TensorBoard too)
    uses_task: bool = True
    one_process: bool = False  # per-image work, files written by the one process
    check: Callable | None = None
    cluster: bool = True  # joins the multi-process job (and is validated against its devices)
    target: Callable | None = None  # config -> the devices it compiles for (compile: a TPU slice)


def restored_run(config: ml_collections.ConfigDict, workdir: str, task: Task,
                 step: int | None, field: str) -> tuple[Run, int, dict]:
    """The run of a saved workdir on the config's mesh, and its EMA parameters of `step` (named
    by config field `field` in errors; default the newest intact one)."""
    workdir = checkpoint.run_directory(workdir)
    mesh = parallel.make_mesh(config.mesh)
    model = jax.device_put(task.model, parallel.replicated(mesh))
    step, ema = runs.restore_ema(config, workdir, task.init_params, task.model, mesh, step, field)
    return Run(config, workdir, mesh, model, make_writer(workdir)), step, ema
