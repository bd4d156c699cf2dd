"""What a task is: the `Task` protocol the loop and the modes call, and the `Run` they share.

A task (the autoencoder, its distilled student, the latent DiT) owns what differs between
models: its config checks, the model pytree, its parameters and loss, its training data, its
evaluator, its benchmark components and, for autoencoders, how a trained run loads. Everything
else (mesh, sharded state, jitted step, checkpoints, logging, preemption) is the loop's, in
`trainer.py`, which imports this module; tasks never import the loop or the modes.
`tasks/registry.py` maps `config.task` to a task; each mode (modes/) names the tasks it serves.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_collections
from clu import metric_writers
from etils import epath


@dataclasses.dataclass
class Run:
    """What evaluation and sampling need from the process that runs them."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: jax.sharding.Mesh
    model: Any  # the task's model pytree, replicated on the mesh
    writer: metric_writers.MetricWriter

    @property
    def is_lead(self) -> bool:
        """Process 0 writes files; every process computes."""
        return jax.process_index() == 0

    def eval_name(self, step: int) -> str:
        """The name of an evaluation of `step` in files: '<step>', or '<step>-<eval.tag>' for
        an evaluation at other settings that must not replace the run's own."""
        tag = self.config.eval.get("tag", "")
        return f"{step}-{tag}" if tag else str(step)

    def write_eval(self, step: int, results: dict) -> None:
        """TensorBoard scalars (under eval/, or eval-<tag>/) and `<workdir>/eval/<step>.json`
        (`<step>-<tag>.json`), from process 0."""
        tag = self.config.eval.get("tag", "")
        prefix = f"eval-{tag}" if tag else "eval"
        self.writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in results.items()
                                         if isinstance(v, (int, float))})
        if self.is_lead:
            path = self.workdir / "eval" / f"{self.eval_name(step)}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"step": step, **results}, indent=1))


def make_writer(workdir: epath.Path) -> metric_writers.MetricWriter:
    """TensorBoard files and log lines from process 0; log lines only from the others."""
    return metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0,
                                                asynchronous=True)


class Evaluator(Protocol):
    """Built once per run by `Task.evaluator` (jitted functions, frozen networks on the mesh)."""

    def evaluate(self, params, step: int) -> dict[str, float]: ...


class Task(Protocol):
    """What a model brings to the loop and the modes. `model` is a pytree (static config + frozen
    arrays such as LPIPS weights) handed to every jitted function as an argument, never closed
    over. Which modes apply to which tasks is declared by the modes (modes/)."""

    model: Any
    # Top-level parameter modules that never train: in params and EMA as loaded, with no
    # gradient, optimiser state or EMA update (steps.py); () for most tasks.
    frozen: tuple[str, ...]

    @classmethod
    def complete_config(cls, config: ml_collections.ConfigDict, user_set: dict) -> None:
        """Fills, in place and before validation, the fields the task takes from elsewhere (a
        distillation: its teacher run's networks and data); `user_set` holds the fields given
        on the command line (flat 'a.b' -> value), which win or, where they cannot, are
        refused in one line."""

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict, mode: str) -> None:
        """Raises ConfigError naming the first bad field of the task's own config sections,
        before the task is built (validation.py calls it after the cross-cutting checks)."""

    @staticmethod
    def init_params(model, rng: jax.Array) -> Any: ...

    @staticmethod
    def loss_fn(model, params, batch: dict, rng: jax.Array,
                step: jax.Array) -> tuple[jax.Array, dict]: ...

    def train_data(self, process_index: int, process_count: int): ...

    def pretrained_params(self) -> dict:
        """Weights a new run starts from instead of its random init, {module: pure dict of host
        arrays} for the modules they replace in params and EMA; {} to train from scratch."""

    def bad_image_log(self, workdir, process_index: int, process_count: int):
        """After train_data: a data/bad_images.BadImageLog for batches that carry `bad_path`,
        or None."""

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]: ...

    def describe(self, param_totals: dict[str, int]) -> dict: ...

    def evaluator(self, run: Run) -> Evaluator: ...

    def executables(self, mesh: jax.sharding.Mesh, params) -> dict[str, Callable]:
        """name -> a function that lowers, for `mesh` and the config's batch size, what a run
        of this task compiles besides the train step (its evaluation's step), from abstract
        `params` placed as the trainer places them: what `--mode=compile` compiles."""

    def benchmark_names(self) -> tuple[str, ...]:
        """The inference components `--mode=benchmark` can time besides the train step."""

    def benchmark_components(self, names, params, mesh: jax.sharding.Mesh,
                             data: Callable) -> dict[str, tuple[Callable, tuple, float | None]]:
        """name -> (function, arguments, FLOPs or None for XLA's count) of the named components
        on `params`; `data(*shape, dtype=, fill=)` gives a global batch of synthetic inputs."""


class AutoencoderLike(Task, Protocol):
    """A task whose runs hold an autoencoder (DGAE or SD-VAE, a distilled student): what the
    Python API, the latent cache, the sweep and the DiT's decoding load."""

    @classmethod
    def load_trained(cls, config: ml_collections.ConfigDict, workdir: str,
                     mesh: jax.sharding.Mesh, step: int | None = None,
                     field: str = "eval.step") -> tuple[int, Any, dict]:
        """(step, Autoencoder without LPIPS weights, EMA {'encoder', 'decoder'} on `mesh`) of
        checkpoint `step` (default the newest intact one) of the run in `workdir`."""

    def sweep_settings(self) -> list[dict]:
        """The decode settings `--mode=sweep` evaluates, keyword arguments of the evaluator's
        `evaluate`."""
