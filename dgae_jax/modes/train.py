"""`--mode=train`: train, resuming from the latest checkpoint in --workdir (trainer.py)."""

from __future__ import annotations

from dgae_jax import trainer
from dgae_jax.modes.base import ALL_TASKS, Mode

MODE = Mode(trainer.train_and_evaluate, ALL_TASKS)
