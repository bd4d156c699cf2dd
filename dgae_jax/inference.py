"""The one loader of trained runs: a checkpoint's EMA parameters, and models without training-only
weights. Evaluation, sampling, the latent cache and the LDM's decoder all restore through here.

Only the checkpoint's `ema` item is read (no optimiser state, no raw parameters), into the
shardings the config's rules give on the mesh wanted now, so a run trained on one mesh is used on
another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from dgae_jax import checkpoint, parallel
from dgae_jax.autoencoder import Autoencoder
from dgae_jax.errors import ConfigError


def checkpoint_steps(config: ml_collections.ConfigDict, workdir: str) -> list[int]:
    """The saved steps of a run; a workdir without any is an error naming it."""
    directory = checkpoint.run_directory(workdir) / "checkpoints"
    if not directory.exists():  # checked first: the checkpoint manager would create it
        raise ConfigError(f"no checkpoint in {directory}: expected a trained run's workdir")
    ckpt = checkpoint.Checkpoints(workdir, config)
    try:
        steps = ckpt.all_steps()
    finally:
        ckpt.close()
    if not steps:
        raise ConfigError(f"no checkpoint in {directory}: expected a trained run's workdir")
    return steps


def resolve_step(config: ml_collections.ConfigDict, workdir: str, step: int | None,
                 field: str) -> int:
    """`step` (named by config field `field` in errors) if saved, else the latest step."""
    steps = checkpoint_steps(config, workdir)
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ConfigError(f"{field}={step}: {checkpoint.run_directory(workdir) / 'checkpoints'} "
                          f"has no checkpoint of that step (it has {steps})")
    return step


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
    """(step, EMA parameters) of `step` of the run in `workdir`, verified against its
    checksums. Without a step, the latest intact one: a corrupt newer one is logged and skipped
    (not moved: the run may be training), unless config.restore_fallback is off."""
    requested = step
    step = resolve_step(config, workdir, step, field)
    abstract = abstract_params(config, init_params, model, mesh)
    ckpt = checkpoint.Checkpoints(workdir, config)
    try:
        if requested is None:
            step, ema = ckpt.restore_intact(lambda s: ckpt.restore_ema(abstract, s),
                                            fallback=config.restore_fallback, move_aside=False)
        else:
            step, ema = ckpt.restore_ema(abstract, step)
    finally:
        ckpt.close()
    logging.info("restored the EMA parameters of step %d from %s", step, ckpt.directory)
    return step, ema


def load_autoencoder(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
                     step: int | None = None, field: str = "eval.step"):
    """(step, Autoencoder without LPIPS weights, EMA parameters on `mesh`) of a trained run: all
    that encoding and decoding need."""
    model = Autoencoder.from_config(config, with_lpips=False)
    step, ema = restore_ema(config, workdir, Autoencoder.init, model, mesh, step, field)
    return step, model, ema
