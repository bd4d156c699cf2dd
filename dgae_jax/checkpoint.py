"""Orbax checkpoints of a training run: the sharded train state, the data iterator, the config.

One `CheckpointManager` per run directory with four items per step: `state` (params, optimiser,
step, RNG key data), `ema` (the EMA parameters: what evaluation, caching, sampling and export
use, saved apart so that they restore without the optimiser), `data` (the grain iterator
position of the batches actually consumed) and `config` (JSON). Saves are asynchronous; the
latest N and every K-th step are kept. Restores go into an abstract target that carries the
shardings wanted now, so the state restores on another mesh; training resumes only with the
process count that saved it (the data position is per process), which is checked first. Errors
propagate: a checkpoint that cannot be restored stops the run.
"""

from __future__ import annotations

import json
import os

import grain
import jax
from absl import logging
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from dgae_jax.errors import ConfigError


def run_directory(workdir: str | os.PathLike) -> epath.Path:
    """A run directory: an absolute local path (Orbax needs one) or a bucket URL as given."""
    workdir = os.fspath(workdir)
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def _manager(directory: epath.Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    keep = [policies.LatestN(config.checkpoint_keep)]
    if config.checkpoint_keep_every:
        keep.append(policies.EveryNSteps(config.checkpoint_keep_every))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.FixedIntervalPolicy(config.checkpoint_every),
        preservation_policy=policies.AnyPreservationPolicy(keep),
        create=True, cleanup_tmp_directories=True)  # what a killed save left is removed
    return ocp.CheckpointManager(directory, item_names=("state", "ema", "data", "config"),
                                 options=options)


class Checkpoints:
    """Save / restore of one run's checkpoints in `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        self.directory = run_directory(workdir) / "checkpoints"
        self.manager = _manager(self.directory, config)
        self.config_json = json.loads(config.to_json_best_effort())

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
        """Saves when the interval policy says so (or `force`); returns whether it did."""
        train = {k: v for k, v in state.items() if k != "ema"}
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(train),
            ema=ocp.args.StandardSave(state["ema"]),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(self.config_json)))

    def restore(self, abstract_state, data_iter=None, step: int | None = None):
        """Restores `state` (into `abstract_state`'s shapes and shardings) and, if given, moves
        `data_iter` to the saved position. Returns (step, state)."""
        step = self._step(step)
        if data_iter is not None:
            self._check_process_count(step)
        train = {k: v for k, v in abstract_state.items() if k != "ema"}
        items = {"state": ocp.args.StandardRestore(train),
                 "ema": ocp.args.StandardRestore(abstract_state["ema"])}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return step, dict(restored["state"], ema=restored["ema"])

    def restore_ema(self, abstract_params, step: int | None = None):
        """Only the EMA parameters (no optimiser state is read). Returns (step, ema)."""
        step = self._step(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            ema=ocp.args.StandardRestore(abstract_params)))
        return step, restored["ema"]

    def _check_process_count(self, step: int) -> None:
        """The data item holds one iterator position per process (grain's
        `process_<i>-of-<n>.json`): it resumes only with the same number of processes."""
        names = [p.name for p in (self.directory / str(step) / "data").glob("process_*-of-*.json")]
        saved = {int(n.rsplit("-of-", 1)[1].split(".")[0]) for n in names}
        if saved and saved != {jax.process_count()}:
            raise ConfigError(
                f"checkpoint {step} in {self.directory} was saved by {max(saved)} processes and "
                f"this run has {jax.process_count()}: the data position is kept per process and "
                f"cannot carry over; resume with {max(saved)} processes (any mesh and device "
                "count per process; evaluation, caching and sampling use any count)")

    def _step(self, step: int | None) -> int:
        step = self.latest_step if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        """Waits for the save in flight, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    def discard_incomplete(self) -> None:
        """Removes the temporary directories of saves that did not complete (the lead process
        does; Orbax never restores them, and a restart would remove them too)."""
        if jax.process_index() != 0:
            return
        for path in self.directory.glob("*.orbax-checkpoint-tmp*"):
            path.rmtree()
            logging.warning("removed the incomplete checkpoint %s", path)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying `shardings`: the restore target."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)
