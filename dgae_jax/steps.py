"""The pure, sharded pieces of a training run: state init and the train step, jitted.

Kept apart from the loop (`trainer.py`) so benchmarks, summaries and tests can build and time the
exact step the trainer runs without its logging and checkpointing stack. `build_steps` only
traces shapes (nothing is allocated or compiled); the jitted functions compile on first call or
through `.lower(...).compile()`.

Train state (a plain dict, what Orbax saves):
    step       int32 scalar, the number of train steps taken (skipped ones included)
    params     float32 parameters
    opt_state  optax state
    ema        exponential moving average of params (used for evaluation and sampling)
               A task's `frozen` modules (e.g. a pretrained encoder under a decoder that trains
               on its latents) are in params and ema, identical, and never change: they get
               no gradient, no optimiser state and no EMA update, and are saved as they were.
    rng        uint32 key data; the step key is fold_in(rng, step), so a resumed run draws the
               same randomness as an uninterrupted one
    nonfinite  int32 scalar, how many steps in a row up to now had a non-finite loss or
               gradient: such a step is not applied (params, opt_state and ema stay as they
               were), and the loop stops after `max_nonfinite_steps` in a row
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dgae_jax import checkpoint, optim, parallel
from dgae_jax.costs import GIB, hlo_flops
from dgae_jax.errors import ConfigError
from dgae_jax.tasks.base import Task

State = dict[str, Any]


def split_frozen(task: Task, tree: dict) -> tuple[dict, dict]:
    """(the modules that train, the task's `frozen` ones) of params or EMA."""
    return ({k: v for k, v in tree.items() if k not in task.frozen},
            {k: v for k, v in tree.items() if k in task.frozen})


def make_init(task: Task, tx: optax.GradientTransformation) -> Callable:
    def init(model, rng: jax.Array) -> State:
        rng_params, rng_train = jax.random.split(rng)
        params = task.init_params(model, rng_params)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": tx.init(split_frozen(task, params)[0]),
                "ema": jax.tree.map(jnp.copy, params), "rng": jax.random.key_data(rng_train),
                "nonfinite": jnp.zeros((), jnp.int32)}
    return init


def make_train_step(task: Task, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict) -> Callable:
    schedule = optim.learning_rate(config)

    def train_step(model, state: State, batch: dict) -> tuple[State, dict]:
        step = state["step"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        params, frozen = split_frozen(task, state["params"])
        ema, frozen_ema = split_frozen(task, state["ema"])
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: task.loss_fn(model, {**frozen, **p}, batch, rng, step), has_aux=True)(params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_ema = optim.update_ema(ema, new_params, optim.ema_decay(config, step))
        # A non-finite loss or gradient leaves the run where it was (selected, not branched:
        # both sides are already computed and the selects fuse into the update).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_params, opt_state, new_ema = jax.tree.map(
            lambda n, o: jnp.where(finite, n, o), (new_params, opt_state, new_ema),
            (params, state["opt_state"], ema))
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(step),
                       nonfinite=(~finite).astype(jnp.float32))
        return dict(state, step=step + 1, params={**frozen, **new_params}, opt_state=opt_state,
                    ema={**frozen_ema, **new_ema},
                    nonfinite=jnp.where(finite, 0, state["nonfinite"] + 1)), metrics
    return train_step


@dataclasses.dataclass
class StepFns:
    """The sharded, jitted pieces of a run (built without allocating or compiling anything)."""

    mesh: jax.sharding.Mesh
    state_shardings: Any
    abstract_state: Any
    init: Callable  # (model, rng) -> state, created sharded
    train_step: Callable  # (model, state, batch) -> (state, metrics), state donated


def build_steps(config: ml_collections.ConfigDict, task: Task,
                mesh: jax.sharding.Mesh) -> StepFns:
    if config.batch_size % mesh.size:  # also checked at start-up for the configured mesh
        raise ConfigError(f"batch_size={config.batch_size} (global) is not divisible by the "
                          f"{mesh.size} devices of the mesh")
    tx = optim.make_optimizer(config)
    init = make_init(task, tx)
    abstract = jax.eval_shape(init, task.model, jax.random.key(0))
    shardings = parallel.tree_shardings(abstract, mesh, config.sharding)
    repl = parallel.replicated(mesh)
    model_sh = jax.tree.map(lambda _: repl, task.model)
    return StepFns(
        mesh=mesh, state_shardings=shardings,
        abstract_state=checkpoint.abstract_like(abstract, shardings),
        init=jax.jit(init, in_shardings=(model_sh, repl), out_shardings=shardings),
        train_step=jax.jit(make_train_step(task, tx, config),
                           in_shardings=(model_sh, shardings, parallel.batch_sharding(mesh)),
                           out_shardings=(shardings, repl), donate_argnums=1))


def compile_train_step(fns: StepFns, model, state: State, batch: dict):
    """Lowers and compiles the train step for these arguments once, before the loop, and
    reports its compile time, FLOPs and per-device memory (XLA's analysis of the module). On
    a backend that reports device memory (GPU, TPU), a step that cannot fit stops here with one
    line, before any training; the CPU backend reports none and is not checked.
    Returns (compiled step, report dict)."""
    start = time.time()
    lowered = fns.train_step.lower(model, state, batch)
    compiled = lowered.compile()
    report = {"compile_s": time.time() - start, "flops": hlo_flops(lowered)}
    memory = compiled.memory_analysis()
    if memory is not None:
        report.update(argument_bytes=memory.argument_size_in_bytes,
                      output_bytes=memory.output_size_in_bytes,
                      alias_bytes=memory.alias_size_in_bytes,
                      temp_bytes=memory.temp_size_in_bytes,
                      code_bytes=memory.generated_code_size_in_bytes)
        report["needed_bytes"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                  - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    stats = jax.local_devices()[0].memory_stats() or {}
    report["device_bytes"] = stats.get("bytes_limit")
    if report["device_bytes"] and report.get("needed_bytes", 0) > report["device_bytes"]:
        raise ConfigError(
            f"the train step needs {report['needed_bytes'] / GIB:.2f} GiB per device (arguments "
            f"{report['argument_bytes'] / GIB:.2f}, temporaries {report['temp_bytes'] / GIB:.2f})"
            f" but {jax.local_devices()[0].device_kind} has {report['device_bytes'] / GIB:.2f} "
            "GiB: lower batch_size or raise mesh.fsdp")
    return compiled, report


def describe_compiled(report: dict) -> str:
    """One log line of `compile_train_step`'s report."""
    line = f"train step compiled in {report['compile_s']:.1f} s"
    if "needed_bytes" in report:
        line += (f"; per device: arguments {report['argument_bytes'] / GIB:.3f} GiB, outputs "
                 f"{report['output_bytes'] / GIB:.3f} GiB (aliased "
                 f"{report['alias_bytes'] / GIB:.3f}), temporaries "
                 f"{report['temp_bytes'] / GIB:.3f} GiB, code "
                 f"{report['code_bytes'] / 2**20:.1f} MiB; needed "
                 f"{report['needed_bytes'] / GIB:.3f} GiB")
    device = report["device_bytes"]
    return line + (f" of {device / GIB:.2f} GiB" if device else
                   " (the backend reports no device memory)")
