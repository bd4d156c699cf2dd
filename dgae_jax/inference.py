"""The one loader of trained runs: a checkpoint's EMA parameters, and models without training-only
weights. Evaluation, sampling, the latent cache and the LDM's decoder all restore through here.

Only the checkpoint's `ema` item is read (no optimiser state, no raw parameters), into the
shardings the config's rules give on the mesh wanted now, so a run trained on one mesh is used on
another.
"""

from __future__ import annotations

import json
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


def teacher_run(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, int]:
    """(saved config, step) of a distillation's teacher (distill.teacher, at distill.teacher_step
    or its latest step), which must have been trained with the student's image size and model."""
    d = config.distill
    ckpt = checkpoint.Checkpoints(d.teacher, None)
    try:
        steps = ckpt.all_steps()
        step = d.teacher_step if d.teacher_step is not None else (steps[-1] if steps else None)
        if step not in steps:
            raise ConfigError(f"distill.teacher={d.teacher!r} has no checkpoint"
                              f"{'' if step is None else f' of step {step} (it has {steps})'}")
        saved = ml_collections.ConfigDict(ckpt.saved_config(step))
    finally:
        ckpt.close()
    ours = json.loads(config.to_json_best_effort())
    theirs = json.loads(saved.to_json_best_effort())
    for key in ("image_size", "model"):
        if ours[key] != theirs[key]:
            where = first_difference(theirs[key], ours[key], key)
            raise ConfigError(f"distill.teacher={d.teacher!r} was trained with {where}: the "
                              "student must have the teacher's networks (use its config variants)")
    return saved, step


def first_difference(theirs, ours, path: str) -> str:
    """'model.unet.width=128, this config 64' for the first field where two JSON trees differ."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        for key in sorted(theirs.keys() | ours.keys()):
            if theirs.get(key) != ours.get(key):
                return first_difference(theirs.get(key), ours.get(key), f"{path}.{key}")
    return f"{path}={theirs!r}, this config {ours!r}"


def load_autoencoder(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
                     step: int | None = None, field: str = "eval.step"):
    """(step, Autoencoder without LPIPS weights, EMA parameters on `mesh`) of a trained run: all
    that encoding and decoding need. A distillation run (config.task 'distill') saves only its
    student decoder; it is paired with the teacher's EMA encoder."""
    model = Autoencoder.from_config(config, with_lpips=False)
    if config.task != "distill":
        step, ema = restore_ema(config, workdir, Autoencoder.init, model, mesh, step, field)
        return step, model, ema
    step, student = restore_ema(config, workdir, _decoder_init, model, mesh, step, field)
    teacher_config, teacher_step = teacher_run(config)
    _, _, teacher = load_autoencoder(teacher_config, config.distill.teacher, mesh, teacher_step,
                                     "distill.teacher_step")
    return step, model, {"encoder": teacher["encoder"], "decoder": student["decoder"]}


def _decoder_init(model: Autoencoder, rng: jax.Array) -> dict:
    """The shapes of a distillation run's parameters: a decoder."""
    return {"decoder": model.init(rng)["decoder"]}
