"""`--mode=summary`: parameter counts, latent shape and train-step FLOPs, without allocating.

Everything is abstract: parameters come from `jax.eval_shape`, FLOPs from XLA's cost analysis of
the trainer's own step, lowered (not compiled) on one device for the global batch, so the full
paper models summarise in seconds on a CPU.
"""

from __future__ import annotations

from collections import defaultdict

import jax
import ml_collections

from dgae_jax import parallel
from dgae_jax.costs import hlo_flops
from dgae_jax.modes.base import ALL_TASKS, Mode
from dgae_jax.steps import build_steps


def count_by_module(params, depth: int) -> dict[str, int]:
    """Parameter counts per module path, truncated to its first `depth` components."""
    counts: dict[str, int] = defaultdict(int)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        modules = [str(getattr(k, "key", k)) for k in path][:-1]  # drop 'kernel', 'bias', ...
        counts["/".join(modules[:depth])] += leaf.size
    return dict(counts)


def train_step_flops(config: ml_collections.ConfigDict, task) -> float:
    """FLOPs of one train step on the global batch (XLA's HLO cost analysis)."""
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), jax.devices()[:1])
    fns = build_steps(config, task, mesh)
    model = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), task.model)
    batch = task.batch_spec(config.batch_size)
    return hlo_flops(fns.train_step.lower(model, fns.abstract_state, batch))


def summarize(config: ml_collections.ConfigDict, task) -> dict:
    """Prints a table and returns the JSON record (whose line is printed last)."""
    params = jax.eval_shape(task.init_params, task.model, jax.random.key(0))
    rows = count_by_module(params, depth=3)
    totals = count_by_module(params, depth=1)
    width = max(len(k) for k in rows) + 2
    print(f"{'module':<{width}}{'params':>14}")
    for name in totals:
        for k, n in rows.items():
            if k.split("/")[0] == name:
                print(f"{k:<{width}}{n:>14,}")
        print(f"{name + ' total':<{width}}{totals[name]:>14,}\n")
    flops = train_step_flops(config, task)
    record = {
        "config": config.name,
        **task.describe(totals),
        "total_params": sum(totals.values()),
        "batch_size": config.batch_size,
        "train_step_flops": flops,
        "train_step_flops_per_example": flops / config.batch_size,
    }
    print(f"latent shape {tuple(record['latent_shape'])}; train step (global batch "
          f"{config.batch_size}): {flops / 1e12:.2f} TFLOPs")
    return record


MODE = Mode(summarize, ALL_TASKS, workdir=False, cluster=False)
