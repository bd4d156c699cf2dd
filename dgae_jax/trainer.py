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
from clu import parameter_overview, periodic_actions

from dgae_jax import checkpoint, parallel
from dgae_jax.steps import State, build_steps
from dgae_jax.tasks.base import Run, Task, make_writer


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task: Task,
                       mesh: jax.sharding.Mesh | None = None) -> State:
    """Trains to `config.total_steps`, resuming from the latest checkpoint in `workdir`."""
    workdir = checkpoint.run_directory(workdir)
    mesh = mesh or parallel.make_mesh(config.mesh)
    run_fns = build_steps(config, task, mesh)
    model = jax.device_put(task.model, parallel.replicated(mesh))
    writer = make_writer(workdir)
    run = Run(config, workdir, mesh, model, writer)
    evaluator = task.evaluator(run)
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
                run.write_eval(step, evaluator.evaluate(state["ema"], step))
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
