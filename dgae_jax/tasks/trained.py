"""A trained autoencoder run loaded for inference, whichever task trained it (the autoencoder,
a distilled student): what the Python API, the latent cache job and the DiT's decoding call."""

from __future__ import annotations

import jax
import ml_collections

from dgae_jax.errors import ConfigError
from dgae_jax.tasks.ae import AutoencoderTask
from dgae_jax.tasks.distill import DistillationTask

AUTOENCODER_TASKS = {"autoencoder": AutoencoderTask, "distill": DistillationTask}


def autoencoder_task(config: ml_collections.ConfigDict, where: str) -> type:
    """The task class of a run that holds an autoencoder; `where` names the run in errors."""
    cls = AUTOENCODER_TASKS.get(config.get("task"))
    if cls is None:
        raise ConfigError(f"{where} is a {config.get('task')!r} run, not an autoencoder")
    return cls


def load_autoencoder(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
                     step: int | None = None, field: str = "eval.step"):
    """(step, Autoencoder without LPIPS weights, EMA {'encoder', 'decoder'} on `mesh`) of
    checkpoint `step` (default the newest intact one) of the run in `workdir`, trained with
    `config`."""
    return autoencoder_task(config, workdir).load_trained(config, workdir, mesh, step, field)
