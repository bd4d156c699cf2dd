"""`--mode=train`: train, resuming from the latest checkpoint in --workdir (trainer.py)."""

from __future__ import annotations

import ml_collections

from dgae_jax import trainer
from dgae_jax.modes.base import ALL_TASKS, Mode
from dgae_jax.tasks.base import Task


def train(config: ml_collections.ConfigDict, workdir: str, task: Task) -> None:
    """Trains; the final state stays with the trainer's callers (the CLI prints no record)."""
    trainer.train_and_evaluate(config, workdir, task)


MODE = Mode(train, ALL_TASKS)
