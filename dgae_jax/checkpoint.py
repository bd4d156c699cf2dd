"""Orbax checkpoints of a training run: the sharded train state, the data iterator, the config.

One `CheckpointManager` per run directory with five items per step: `state` (params, optimiser,
step, RNG key data), `ema` (the EMA parameters: what evaluation, caching, sampling and export
use, saved apart so that they restore without the optimiser), `data` (the grain iterator
position of the batches actually consumed), `config` (JSON) and `checksums` (JSON: a checksum of
every array of `state` and `ema`, computed on the devices at save, checksums.py). Saves are
asynchronous; the latest N and every K-th step are kept; what a killed save left half-written is
removed when the next run opens the directory. Restores go into an abstract target that carries
the shardings wanted now, so the state restores on another mesh; training resumes only with the
process count that saved it (the data position is per process), which is checked first.

Every restore recomputes the checksums of what it read: a checkpoint that does not match, or
whose item cannot be read, raises `CorruptCheckpoint` naming the step, the item and the array.
`restore_intact` then falls back to the newest intact checkpoint, saying which step was bad and
why, and (for training) moves the bad one aside to `<workdir>/corrupt_checkpoints/` (never
deleting it). Any other error propagates.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import grain
import jax
from absl import logging
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from dgae_jax import checksums
from dgae_jax.errors import CheckpointWriteError, ConfigError, CorruptCheckpoint

ITEMS = ("state", "ema", "data", "config", "checksums")


def run_directory(workdir: str | os.PathLike) -> epath.Path:
    """A run directory: an absolute local path (Orbax needs one) or a bucket URL as given."""
    workdir = os.fspath(workdir)
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def _manager(directory: epath.Path,
             config: ml_collections.ConfigDict | None) -> ocp.CheckpointManager:
    if config is None:  # reading a run whose config is not known yet: change nothing on disk
        options = ocp.CheckpointManagerOptions(create=False, read_only=True)
        return ocp.CheckpointManager(directory, item_names=ITEMS, options=options)
    keep = [policies.LatestN(config.checkpoint_keep)]
    if config.checkpoint_keep_every:
        keep.append(policies.EveryNSteps(config.checkpoint_keep_every))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.FixedIntervalPolicy(config.checkpoint_every),
        preservation_policy=policies.AnyPreservationPolicy(keep),
        create=True, cleanup_tmp_directories=True)  # what a killed save left is removed
    return ocp.CheckpointManager(directory, item_names=ITEMS, options=options)


class Checkpoints:
    """Save / restore of one run's checkpoints in `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict | None):
        """`config` None: read-only, to read what a run saved (its config first)."""
        self.directory = run_directory(workdir) / "checkpoints"
        self.manager = _manager(self.directory, config)
        self.config_json = None if config is None else json.loads(config.to_json_best_effort())

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
        """Saves when the interval policy says so (or `force`); returns whether it did."""
        if not force and not self.manager.should_save(step):
            return False
        train = {k: v for k, v in state.items() if k != "ema"}
        sums = {"state": checksums.tree_checksums(train),
                "ema": checksums.tree_checksums(state["ema"])}
        with self._writing(f"checkpoint {step}"):  # also reports an earlier save's failure
            return self.manager.save(step, force=force, args=ocp.args.Composite(
                state=ocp.args.StandardSave(train),
                ema=ocp.args.StandardSave(state["ema"]),
                data=grain.checkpoint.CheckpointSave(data_iter),
                config=ocp.args.JsonSave(self.config_json),
                checksums=ocp.args.JsonSave(sums)))

    @contextlib.contextmanager
    def _writing(self, what: str):
        """Any failure to write becomes one CheckpointWriteError naming the directory."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as error:
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            raise CheckpointWriteError(f"cannot save {what} (or finish the one before it) in "
                                       f"{self.directory}: {reason}") from error

    def restore(self, abstract_state, data_iter=None, step: int | None = None):
        """Restores `state` (into `abstract_state`'s shapes and shardings), verified, and, if
        given, moves `data_iter` to the saved position. Returns (step, state)."""
        step = self._step(step)
        if data_iter is not None:
            self._check_process_count(step)
        train = {k: v for k, v in abstract_state.items() if k != "ema"}
        sums = self._read(step, "checksums", ocp.args.JsonRestore())
        state = self._verified(step, "state", ocp.args.StandardRestore(train), sums)
        ema = self._verified(step, "ema", ocp.args.StandardRestore(abstract_state["ema"]), sums)
        if data_iter is not None:
            self._read(step, "data", grain.checkpoint.CheckpointRestore(data_iter))
        return step, dict(state, ema=ema)

    def restore_ema(self, abstract_params, step: int | None = None):
        """Only the EMA parameters (no optimiser state is read), verified. Returns (step, ema)."""
        step = self._step(step)
        sums = self._read(step, "checksums", ocp.args.JsonRestore())
        return step, self._verified(step, "ema", ocp.args.StandardRestore(abstract_params), sums)

    def saved_config(self, step: int) -> dict:
        """The config (as JSON) the run saved with checkpoint `step`."""
        return self._read(step, "config", ocp.args.JsonRestore())

    def restore_intact(self, restore, *, fallback: bool, move_aside: bool):
        """`restore(step)` of the newest step that restores intact. A corrupt step is logged;
        with `fallback` the next older one is tried (a corrupt one moved aside first if
        `move_aside`), without it the corruption is raised as one line."""
        error = None
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return restore(step)
            except CorruptCheckpoint as corrupt:
                error = corrupt
                if not fallback:
                    raise CorruptCheckpoint(error.step, error.item, f"{error.reason} in "
                                            f"{self.directory} (restore_fallback=True uses the "
                                            "newest intact checkpoint)") from None
                logging.error("%s; trying an older checkpoint", error)
                if move_aside:
                    self.move_aside(step)
        raise CorruptCheckpoint(error.step, error.item, f"{error.reason}, and it was the oldest"
                                f": no checkpoint in {self.directory} is intact")

    def move_aside(self, step: int) -> None:
        """Moves checkpoint `step` to `<workdir>/corrupt_checkpoints/` (the lead process does;
        all processes wait for it), where the manager no longer sees it."""
        if jax.process_index() == 0:
            target = self.directory.parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
            logging.warning("moved the corrupt checkpoint %d to %s", step, target)
        multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()

    def _read(self, step: int, item: str, args):
        """One item of `step`; any failure to read it is corruption of that item."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
        except Exception as error:  # Orbax, tensorstore, JSON and grain each raise their own
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            raise CorruptCheckpoint(step, item, f"cannot be read ({reason})") from error

    def _verified(self, step: int, item: str, args, sums: dict):
        tree = self._read(step, item, args)
        bad = checksums.mismatches(sums.get(item, {}), tree)
        if bad:
            raise CorruptCheckpoint(step, item, f"does not match its checksums in {len(bad)} "
                                    f"array(s), first {bad[0]}")
        return tree

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
        with self._writing("the last checkpoint"):
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
