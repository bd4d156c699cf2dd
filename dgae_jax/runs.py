"""The one reader of saved runs: the steps a run's workdir holds, the config it saved with a step,
and a step's EMA parameters. The Python API, the modes, the latent cache job and the tasks (a
distillation's teacher, the DiT's decoder) all read runs through here.

Reading never changes a run: its checkpoints are opened read-only, so a run that is still
training can be read. Only a checkpoint's `ema` item is restored (no optimiser state, no raw
parameters), into the shardings the config's rules give on the mesh wanted now, so a run trained
on one mesh is used on another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dgae_jax import checkpoint, parallel
from dgae_jax.errors import ConfigError


@contextlib.contextmanager
def _opened(workdir: str) -> Iterator[checkpoint.Checkpoints]:
    """The run's checkpoints, read-only; a workdir without any is an error naming it."""
    directory = checkpoint.run_directory(workdir) / "checkpoints"
    if not directory.exists():  # checked first: Orbax would take it for an empty run
        raise ConfigError(f"no checkpoint in {directory}: expected a trained run's workdir")
    ckpt = checkpoint.Checkpoints(workdir, None)
    try:
        if not ckpt.all_steps():
            raise ConfigError(f"no checkpoint in {directory}: expected a trained run's workdir")
        yield ckpt
    finally:
        ckpt.close()


def _check_step(ckpt: checkpoint.Checkpoints, step: int, field: str) -> None:
    steps = ckpt.all_steps()
    if step not in steps:
        raise ConfigError(f"{field}={step}: {ckpt.directory} has no checkpoint of that step "
                          f"(it has {steps})")


def is_run(workdir: str) -> bool:
    """Whether `workdir` looks like a run's workdir (it has checkpoints/)."""
    return (checkpoint.run_directory(workdir) / "checkpoints").is_dir()


def saved_config(workdir: str, step: int | None = None,
                 field: str = "step") -> tuple[int, ml_collections.ConfigDict]:
    """(step, the config the run saved with checkpoint `step`). Without a step, the newest step
    whose config reads intact (a corrupt newer one is logged and skipped). `field` names the
    step in errors."""
    with _opened(workdir) as ckpt:
        if step is not None:
            _check_step(ckpt, step, field)
            return step, ml_collections.ConfigDict(ckpt.saved_config(step))
        step, saved = ckpt.restore_intact(lambda s: (s, ckpt.saved_config(s)), fallback=True,
                                          move_aside=False)
    return step, ml_collections.ConfigDict(saved)


def abstract_params(config: ml_collections.ConfigDict, init_params: Callable, model,
                    mesh: jax.sharding.Mesh) -> Any:
    """ShapeDtypeStructs of `init_params(model, rng)` with the shardings training gives the EMA
    (the rules match the same `ema/...` paths as in the train state)."""
    shapes = jax.eval_shape(init_params, model, jax.random.key(0))
    shardings = parallel.tree_shardings({"ema": shapes}, mesh, config.sharding)["ema"]
    return checkpoint.abstract_like(shapes, shardings)


def restore_ema(config: ml_collections.ConfigDict, workdir: str, init_params: Callable, model,
                mesh: jax.sharding.Mesh, step: int | None = None,
                field: str = "eval.step") -> tuple[int, Any]:
    """(step, EMA parameters) of checkpoint `step` of the run in `workdir`, in the shapes of
    `init_params(model, rng)`, verified against its checksums. Without a step, the newest intact
    one: a corrupt newer one is logged and skipped (not moved: the run may be training), unless
    config.restore_fallback is off. `field` names the step in errors."""
    abstract = abstract_params(config, init_params, model, mesh)
    with _opened(workdir) as ckpt:
        if step is None:
            step, ema = ckpt.restore_intact(lambda s: ckpt.restore_ema(abstract, s),
                                            fallback=config.restore_fallback, move_aside=False)
        else:
            _check_step(ckpt, step, field)
            step, ema = ckpt.restore_ema(abstract, step)
    logging.info("restored the EMA parameters of step %d from %s", step, ckpt.directory)
    return step, ema


def to_host(tree) -> Any:
    """`tree` (restored arrays, sharded over any mesh) as numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return multihost_utils.process_allgather(tree, tiled=True)
