"""The tasks by `config.task`. Each mode (modes/) names the tasks it serves."""

from __future__ import annotations

import ml_collections

from dgae_jax.errors import ConfigError
from dgae_jax.tasks.base import Task
from dgae_jax.tasks.ldm import LatentDiffusionTask
from dgae_jax.tasks.trained import AUTOENCODER_TASKS

TASKS: dict[str, type] = {**AUTOENCODER_TASKS, "ldm": LatentDiffusionTask}


def task_class(config: ml_collections.ConfigDict) -> type:
    """The class of `config.task`."""
    cls = TASKS.get(config.task)
    if cls is None:
        raise ConfigError(f"task={config.task!r} is not one of {', '.join(TASKS)}")
    return cls


def make_task(config: ml_collections.ConfigDict, mode: str) -> Task:
    """The task of `config.task`, set up for `mode` (it loads only what that mode needs)."""
    return task_class(config)(config, mode)
