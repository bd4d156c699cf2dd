"""The `--mode`s, one module each; `main.py` validates, then calls `run`.

    train          train, resuming from the latest checkpoint in --workdir
    eval           evaluate the EMA parameters of the latest (or eval.step) checkpoint
    sample         (ldm) draw and decode samples into <workdir>/samples/<step>/
    cache_latents  (autoencoder) encode the data once into cache.dir
    summary        parameter table, latent shape and train-step FLOPs, without allocating
    benchmark      time the train step and the task's inference components, synthetic inputs
    compile        compile the train, evaluation and cache steps for a TPU slice (libtpu), with
                   per-chip memory, FLOPs and roofline, nothing allocated
    sweep          (autoencoder, distill) eval's metrics at every decode setting of a grid
    reconstruct    (autoencoder, distill) reconstructions and metrics of your images
    export         (autoencoder, distill) an inference bundle, or diffusers' AutoencoderKL

Each module ends with its `MODE` (modes/base.py): what it runs, the tasks it serves, whether it
needs --workdir, the task and a single process, and the checks of the config section it owns.
Every mode but train returns a JSON-able record, which the CLI prints as its last line.
"""

from __future__ import annotations

import ml_collections

from dgae_jax.modes import (benchmark, cache_latents, compile_tpu, evaluate, export, reconstruct,
                            sample, summary, sweep, train)
from dgae_jax.modes.base import Mode
from dgae_jax.tasks import registry
from dgae_jax.tasks.base import Task

MODES: dict[str, Mode] = {
    "train": train.MODE, "eval": evaluate.MODE, "sample": sample.MODE,
    "cache_latents": cache_latents.MODE, "summary": summary.MODE, "benchmark": benchmark.MODE,
    "compile": compile_tpu.MODE, "sweep": sweep.MODE, "reconstruct": reconstruct.MODE,
    "export": export.MODE}


def run(config: ml_collections.ConfigDict, name: str, workdir: str | None = None,
        task: Task | None = None):
    """Runs mode `name` with what it takes: the config, the workdir if it uses one, and the task
    (`task`, or one built for this mode) if it uses one. The config is assumed validated."""
    mode = MODES[name]
    args = [config]
    if mode.workdir:
        args.append(workdir)
    if mode.uses_task:
        args.append(task if task is not None else registry.make_task(config, name))
    return mode.run(*args)
