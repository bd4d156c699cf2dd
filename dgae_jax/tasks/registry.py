"""The tasks by `config.task`, each with the modes it supports."""

from __future__ import annotations

import ml_collections

from dgae_jax.errors import ConfigError
from dgae_jax.tasks.ae import AutoencoderTask
from dgae_jax.tasks.base import Task
from dgae_jax.tasks.distill import DistillationTask
from dgae_jax.tasks.ldm import LatentDiffusionTask

TASKS: dict[str, type] = {"autoencoder": AutoencoderTask, "distill": DistillationTask,
                          "ldm": LatentDiffusionTask}


def task_class(config: ml_collections.ConfigDict, mode: str) -> type:
    """The class of `config.task`, after checking that it supports `mode`."""
    cls = TASKS.get(config.task)
    if cls is None:
        raise ConfigError(f"task={config.task!r} is not one of {', '.join(TASKS)}")
    if mode not in cls.modes:
        raise ConfigError(f"--mode={mode} does not apply to task={config.task!r} (its modes: "
                          f"{', '.join(cls.modes)})")
    return cls


def make_task(config: ml_collections.ConfigDict, mode: str) -> Task:
    """The task of `config.task`, set up for `mode` (it loads only what that mode needs)."""
    return task_class(config, mode)(config, mode)
