"""The one training loop, shared by the autoencoder and the latent DiT: a `Task` plugs in.

The loop owns the mesh, the sharded train state and jitted step (built in `steps.py`), Orbax
checkpoints with the data iterator, clu logging, evaluation cadence and preemption. The task owns
what differs: the model, its loss, its data and its evaluation.
"""

from __future__ import annotations

import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from clu import periodic_actions

from dgae_jax import checkpoint, parallel
from dgae_jax.errors import NonFiniteSteps
from dgae_jax.steps import State, build_steps, compile_train_step, describe_compiled
from dgae_jax.tasks.base import Run, Task, make_writer


# --------------------------------------------------------------------------------- the loop
class _StopRequest:
    """SIGTERM / Ctrl-C set a flag; the loop then checkpoints the current step and exits.

    Every process must stop at the same step (saving is collective), but a signal reaches the
    hosts of a job at different moments. With several processes the flags are therefore combined
    (any process asking stops all) every `every` steps, where the loop already syncs with the
    host for logging; a single process stops at the next step.
    """

    def __init__(self, every: int):
        self.every = every
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C is final

    def agreed(self, step: int) -> bool:
        """Whether every process stops after `step` (the same answer on all of them)."""
        if jax.process_count() == 1:
            return self.requested
        if step % self.every:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Profile:
    """A `jax.profiler` trace of steps [start, end) (`config.profile_steps`) in
    `<workdir>/profile`, for TensorBoard's profile plugin. Every process traces its own host."""

    def __init__(self, config: ml_collections.ConfigDict, workdir):
        window = tuple(config.get("profile_steps") or ())
        self.start, self.end = window if window else (None, None)
        self.directory, self.active = str(workdir / "profile"), False

    def before(self, step: int) -> None:
        if step == self.start:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int) -> None:
        if self.active and step >= self.end:
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info("wrote a profile of steps %d-%d to %s", self.start, self.end - 1,
                         self.directory)


def _mean_metrics(history: list[dict]) -> dict[str, float]:
    """Means over the interval's applied steps (NaN if none was), and how many were skipped."""
    host = jax.device_get(history)  # the one host sync of a log interval
    applied = [h for h in host if not h["nonfinite"]] or [{k: np.nan for k in host[0]}]
    scalars = {k: float(np.mean([h[k] for h in applied])) for k in host[0] if k != "nonfinite"}
    return dict(scalars, nonfinite_steps=float(sum(h["nonfinite"] for h in host)))


def _check_nonfinite(state: State, step: int, limit: int) -> None:
    streak = int(state["nonfinite"])
    if streak >= limit:
        raise NonFiniteSteps(
            f"steps {step - streak + 1}-{step} all had a non-finite loss or gradient "
            f"(max_nonfinite_steps={limit}); none was applied: the parameters, optimiser state "
            "and EMA, and any checkpoint saved since, are those of the last finite step")


def _start_from(state: State, pretrained: dict) -> State:
    """A fresh state whose params and EMA take the task's pretrained modules (same shardings;
    every process places its own shards). The optimiser state is zero whatever the values."""
    if not pretrained:
        return state

    def place(current: jax.Array, value) -> jax.Array:
        value = np.asarray(value, current.dtype)
        return jax.make_array_from_callback(current.shape, current.sharding,
                                            lambda index: value[index])

    for key in ("params", "ema"):
        modules = {m: jax.tree.map(place, state[key][m], values)
                   for m, values in pretrained.items()}
        state = dict(state, **{key: dict(state[key], **modules)})
    return state


def _finish_saving_after_error(ckpt: checkpoint.Checkpoints, error: BaseException) -> None:
    """Lets the checkpoint being written when the loop failed complete (or removes what it left
    half-written), so the run exits with its one original error and a clean directory."""
    try:
        ckpt.close()
    except Exception as failure:  # the original error is the one that propagates
        cause = failure.__cause__
        if failure is not error and (cause is None or cause is not error.__cause__):
            logging.error("the checkpoint being saved when the run stopped (%s: %s) did not "
                          "complete: %s", type(error).__name__, error, failure)
    finally:
        ckpt.discard_incomplete()  # nothing is in flight now: a temporary directory is debris


def _log_start(config, workdir: str, mesh: jax.sharding.Mesh, params, frozen) -> None:
    """What runs, in two lines (`--mode=summary` has the table per module and the FLOPs)."""
    devices = list(mesh.devices.flat)
    logging.info("%s: %d %s device(s) in %d process(es), mesh %s, %d images per step; "
                 "writing %s (tensorboard --logdir %s)", config.name, mesh.size,
                 devices[0].platform, len({d.process_index for d in devices}),
                 " x ".join(f"{axis} {n}" for axis, n in mesh.shape.items()), config.batch_size,
                 workdir, workdir)
    sizes = {m: sum(leaf.size for leaf in jax.tree.leaves(v)) for m, v in params.items()}
    logging.info("parameters: %s; %.2fM in all", ", ".join(
        f"{m} {n / 1e6:.2f}M{' (frozen)' if m in frozen else ''}" for m, n in sizes.items()),
        sum(sizes.values()) / 1e6)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task: Task,
                       mesh: jax.sharding.Mesh | None = None) -> State:
    """Trains to `config.total_steps`, resuming from the latest checkpoint in `workdir`. Any
    error in the loop first lets the checkpoint in flight finish, then propagates unchanged."""
    workdir = checkpoint.run_directory(workdir)
    mesh = mesh or parallel.make_mesh(config.mesh)
    run_fns = build_steps(config, task, mesh)
    model = jax.device_put(task.model, parallel.replicated(mesh))
    writer = make_writer(workdir)
    run = Run(config, workdir, mesh, model, writer)
    evaluator = task.evaluator(run)
    ckpt = checkpoint.Checkpoints(workdir, config)
    data = iter(task.train_data(jax.process_index(), jax.process_count()))
    bad_images = task.bad_image_log(workdir, jax.process_index(), jax.process_count())

    if ckpt.latest_step is not None:
        step, state = ckpt.restore_intact(
            lambda s: ckpt.restore(run_fns.abstract_state, data, s),
            fallback=config.restore_fallback, move_aside=True)
        logging.info("resumed from the checkpoint of step %d in %s", step, ckpt.directory)
    else:
        state = _start_from(run_fns.init(model, jax.random.key(config.seed)),
                            task.pretrained_params())
        step = 0
    _log_start(config, workdir, mesh, state["params"], task.frozen)
    n_devices = mesh.size
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every)
    history, last_log, input_wait = [], (step, time.time()), 0.0
    train_step, profile = None, _Profile(config, workdir)
    try:
        with _StopRequest(config.log_every) as stop:
            while step < config.total_steps:
                profile.before(step)
                wait_start = time.time()
                local = next(data)
                if bad_images is not None:
                    bad_images.add(local["bad_path"])  # host strings: no device sync
                batch = parallel.global_batch(local, mesh)
                input_wait += time.time() - wait_start
                if train_step is None:  # compiled once, before the first step runs
                    train_step, compile_report = compile_train_step(run_fns, model, state, batch)
                    logging.info("%s", describe_compiled(compile_report))
                    last_log = (step, time.time())
                    input_wait = 0.0
                state, metrics = train_step(model, state, batch)
                step += 1
                history.append(metrics)
                report(step)
                profile.after(step)
                if step % config.log_every == 0 or step == config.total_steps:
                    scalars = _mean_metrics(history)
                    if bad_images is not None:
                        scalars["bad_images"] = bad_images.flush()
                    elapsed = time.time() - last_log[1]
                    rate = (step - last_log[0]) * config.batch_size / elapsed
                    scalars.update(images_per_sec=rate, images_per_sec_per_device=rate / n_devices,
                                   step_time_ms=1000 * elapsed / (step - last_log[0]),
                                   input_wait_fraction=input_wait / elapsed)
                    writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                    _check_nonfinite(state, step, config.max_nonfinite_steps)
                    history, last_log, input_wait = [], (step, time.time()), 0.0
                if step % config.eval_every == 0 or step == config.total_steps:
                    eval_start = time.time()
                    run.write_eval(step, evaluator.evaluate(state["ema"], step))
                    # Throughput counts training only.
                    last_log = (last_log[0], last_log[1] + time.time() - eval_start)
                saved = ckpt.save(step, state, data, force=step == config.total_steps)
                if stop.agreed(step) or ckpt.reached_preemption(step):
                    if not saved:
                        ckpt.save(step, state, data, force=True)
                    logging.warning("stopped at step %d after saving a checkpoint", step)
                    break
    except BaseException as error:
        profile.close()
        _finish_saving_after_error(ckpt, error)
        raise
    profile.close()
    ckpt.close()
    writer.flush()
    return state
