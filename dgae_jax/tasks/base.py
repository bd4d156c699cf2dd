"""What a task is: the `Task` protocol the loop and the modes call, and the `Run` they share.

A task (the autoencoder, the latent DiT) owns what differs between models: the model pytree, its
parameters and loss, its training data, and its evaluator. Everything else (mesh, sharded state,
jitted step, checkpoints, logging, preemption) is the loop's, in `trainer.py`, which imports this
module; tasks never import the loop. `tasks/registry.py` maps `config.task` to a task and the
modes it supports.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Protocol

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


class Sampler(Evaluator, Protocol):
    """The evaluator of a task that supports `--mode=sample`."""

    def sample(self, params, step: int) -> dict: ...


class Task(Protocol):
    """What a model brings to the loop. `model` is a pytree (static config + frozen arrays such
    as LPIPS weights) handed to every jitted function as an argument, never closed over."""

    modes: ClassVar[tuple[str, ...]]  # the --mode values this task supports
    model: Any

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
