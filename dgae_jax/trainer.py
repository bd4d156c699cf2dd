"""The one training loop, shared by the autoencoder and the latent DiT: a `Task` plugs in.

The loop owns the mesh, the sharded train state and jitted step (built in `steps.py`), Orbax
checkpoints with the data iterator, clu logging, evaluation cadence and preemption. The task owns
what differs: the model, its loss, its data and its evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from clu import metric_writers, parameter_overview, periodic_actions

from dgae_jax import checkpoint, parallel
from dgae_jax.config_lib import ConfigError
from dgae_jax.steps import State, compile_run


@dataclasses.dataclass
class Run:
    """What a task's evaluation needs from the loop."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: jax.sharding.Mesh
    model: Any  # the task's model pytree, replicated on the mesh
    writer: metric_writers.MetricWriter

    @property
    def is_lead(self) -> bool:
        return jax.process_index() == 0


class Task(Protocol):
    """What a model brings to the loop. `model` is a pytree (static config + frozen arrays such
    as LPIPS weights) handed to every jitted function as an argument."""

    model: Any

    @staticmethod
    def init_params(model, rng: jax.Array) -> Any: ...

    @staticmethod
    def loss_fn(model, params, batch: dict, rng: jax.Array,
                step: jax.Array) -> tuple[jax.Array, dict]: ...

    def train_data(self, process_index: int, process_count: int): ...

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]: ...

    def describe(self, param_totals: dict[str, int]) -> dict: ...

    def evaluate(self, run: Run, params, step: int) -> dict[str, float]: ...


# --------------------------------------------------------------------------------- the loop
class _StopRequest:
    """SIGTERM / Ctrl-C set a flag; the loop then checkpoints the current step and exits."""

    def __init__(self):
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

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _mean_metrics(history: list[dict]) -> dict[str, float]:
    host = jax.device_get(history)  # the one host sync of a log interval
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def make_writer(workdir: epath.Path) -> metric_writers.MetricWriter:
    return metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0,
                                                asynchronous=True)


def write_eval(run: Run, step: int, results: dict[str, float]) -> None:
    """TensorBoard scalars and `<workdir>/eval/<step>.json` (process 0)."""
    run.writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()
                                    if isinstance(v, (int, float))})
    if run.is_lead:
        path = run.workdir / "eval" / f"{step}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step": step, **results}, indent=1))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task: Task,
                       mesh: jax.sharding.Mesh | None = None) -> State:
    """Trains to `config.total_steps`, resuming from the latest checkpoint in `workdir`."""
    workdir = checkpoint.run_directory(workdir)
    mesh = mesh or parallel.make_mesh(config.mesh)
    run_fns = compile_run(config, task, mesh)
    model = jax.device_put(task.model, parallel.replicated(mesh))
    writer = make_writer(workdir)
    run = Run(config, workdir, mesh, model, writer)
    ckpt = checkpoint.Checkpoints(workdir, config)
    data = iter(task.train_data(jax.process_index(), jax.process_count()))

    if ckpt.latest_step is not None:
        step, state = ckpt.restore(run_fns.abstract_state, data)
        logging.info("resumed from the checkpoint of step %d in %s", step, ckpt.directory)
    else:
        state = run_fns.init(model, jax.random.key(config.seed))
        step = 0
    parameter_overview.log_parameter_overview(state["params"])
    n_devices = mesh.size
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every)
    history, last_log = [], (step, time.time())
    with _StopRequest() as stop:
        while step < config.total_steps:
            batch = parallel.global_batch(next(data), mesh)
            state, metrics = run_fns.train_step(model, state, batch)
            step += 1
            history.append(metrics)
            report(step)
            if step % config.log_every == 0 or step == config.total_steps:
                scalars = _mean_metrics(history)
                if not np.isfinite(scalars["loss"]):
                    raise FloatingPointError(f"non-finite loss at step {step}: {scalars}")
                elapsed = time.time() - last_log[1]
                rate = (step - last_log[0]) * config.batch_size / elapsed
                scalars.update(images_per_sec=rate, images_per_sec_per_device=rate / n_devices,
                               step_time_ms=1000 * elapsed / (step - last_log[0]))
                writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                history, last_log = [], (step, time.time())
            if step % config.eval_every == 0 or step == config.total_steps:
                eval_start = time.time()
                write_eval(run, step, task.evaluate(run, state["ema"], step))
                # Throughput counts training only.
                last_log = (last_log[0], last_log[1] + time.time() - eval_start)
            saved = ckpt.save(step, state, data, force=step == config.total_steps)
            if stop.requested or ckpt.reached_preemption(step):
                if not saved:
                    ckpt.save(step, state, data, force=True)
                logging.warning("stopped at step %d after saving a checkpoint", step)
                break
    ckpt.close()
    writer.flush()
    return state


def restore_ema(config: ml_collections.ConfigDict, workdir: str, task: Task,
                step: int | None = None, mesh: jax.sharding.Mesh | None = None):
    """(step, EMA parameters) of a run's latest checkpoint, or of `step`, sharded on `mesh` as
    training shards them. A run directory without checkpoints is an error."""
    directory = checkpoint.run_directory(workdir) / "checkpoints"
    if not directory.exists():  # checked first: the manager would create it
        raise ConfigError(f"no checkpoint in {directory}: expected a trained run's workdir")
    run_fns = compile_run(config, task, mesh or parallel.make_mesh(config.mesh))
    ckpt = checkpoint.Checkpoints(workdir, config)
    try:
        step, state = ckpt.restore(run_fns.abstract_state, step=step)
    finally:
        ckpt.close()
    return step, state["ema"]


def _restored_run(config, workdir: str, task: Task, step: int | None):
    workdir = checkpoint.run_directory(workdir)
    mesh = parallel.make_mesh(config.mesh)
    step, ema = restore_ema(config, workdir, task, step, mesh)
    run = Run(config, workdir, mesh, jax.device_put(task.model, parallel.replicated(mesh)),
              make_writer(workdir))
    return run, step, ema


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, task: Task,
                        step: int | None = None) -> dict:
    """`--mode=eval`: the task's evaluation of a saved run's EMA parameters."""
    run, step, ema = _restored_run(config, workdir, task, step)
    results = task.evaluate(run, ema, step)
    write_eval(run, step, results)
    run.writer.flush()
    return {"step": step, **results}


def sample_checkpoint(config: ml_collections.ConfigDict, workdir: str, task: Task,
                      step: int | None = None) -> dict:
    """`--mode=sample`: the task's samples from a saved run's EMA parameters."""
    run, step, ema = _restored_run(config, workdir, task, step)
    record = task.sample(run, ema, step)
    run.writer.flush()
    return record
