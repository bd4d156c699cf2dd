"""The distillation task (distill.py): a 1- or 2-step student of a trained DGAE, on the shared
trainer.

It is the autoencoder task with another model (whose `init` and `loss_fn` the inherited
`init_params` and `loss_fn` call): the same images, batch spec, bad-image
policy and evaluation. Its config (`configs/distill.py`) is a recipe: `distill.teacher` names the
teacher's run, whose saved config gives the student's networks, image size, data and LPIPS net
(`complete_config`, before validation; checked again when the task starts). Its
checkpoints hold the student decoder only: evaluation, the sweep, reconstruct, export, the API
and the DiT's decoding pair it with the teacher's EMA encoder (`load_trained`), so a student
decodes the teacher's latents, a latent cache made with the teacher included.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections

from dgae_jax import checks, diffusion, parallel, runs
from dgae_jax.autoencoder import Autoencoder
from dgae_jax.checks import require
from dgae_jax.distill import Distillation
from dgae_jax.errors import ConfigError
from dgae_jax.metrics import lpips
from dgae_jax.tasks.ae import AutoencoderTask, eval_executable
from dgae_jax.tasks.ae_eval import AutoencoderEvaluator
from dgae_jax.tasks.base import Run


# What a student takes from its teacher run's saved config (complete_config): fixed, its networks
# and image size; by default, its data and loss section (the LPIPS net).
FROM_TEACHER_FIXED = ("image_size", "model")
FROM_TEACHER = ("data", "loss")


class DistillationTask(AutoencoderTask):
    def __init__(self, config: ml_collections.ConfigDict, mode: str = "train"):
        """Loads the teacher's EMA parameters onto the config's mesh (replicated: they are part
        of the model pytree), after checking its networks are the student's."""
        super().__init__(config, mode)  # LPIPS and the FID Inception as the autoencoder's
        ae = self.model
        d = config.distill
        if max(d.lpips_weight, d.gt_lpips_weight) > 0 and ae.lpips_weights is None:
            ae = dataclasses.replace(ae, lpips_weights=lpips.load_weights(config.loss.lpips_net))
        mesh = parallel.make_mesh(config.mesh)
        self.teacher_step, teacher = load_teacher(config, mesh)
        config.distill.teacher_step = self.teacher_step  # saved with each checkpoint
        self.model = Distillation(ae, jax.device_put(teacher, parallel.replicated(mesh)))

    @classmethod
    def complete_config(cls, config: ml_collections.ConfigDict, user_set: dict) -> None:
        """Takes the teacher run's networks, image size, data and loss (its LPIPS net) from its
        saved config, and names the run '<teacher>-student'. A data or loss field given on the
        command line wins; a network or image-size field that differs from the teacher's is
        refused (the student starts as the teacher's decoder)."""
        d = config.distill
        require(bool(d.teacher), "distill.teacher is required: the teacher run's workdir")
        checks.run_workdir(d.teacher, "distill.teacher")
        checks.optional_step(config, "distill.teacher_step")
        _, saved = runs.saved_config(d.teacher, d.teacher_step, "distill.teacher_step")
        for key, value in user_set.items():
            if key.split(".")[0] in FROM_TEACHER_FIXED:
                theirs = _plain(saved[key.split(".")[0]])
                for part in key.split(".")[1:]:
                    theirs = theirs.get(part) if isinstance(theirs, dict) else None
                if _plain(value) != theirs:
                    raise ConfigError(f"{key}={value!r}, but distill.teacher={d.teacher!r} was "
                                      f"trained with {theirs!r}: a student has its teacher's "
                                      "networks (leave the field out)")
        for key in FROM_TEACHER_FIXED + FROM_TEACHER:
            config[key] = _tuples(saved[key])
        config.update_from_flattened_dict(
            {k: v for k, v in user_set.items() if k.split(".")[0] in FROM_TEACHER})
        if "name" not in user_set:
            config.name = f"{saved.name}-student"

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict, mode: str) -> None:
        """The autoencoder's checks, the distill section, and a sweep's teacher steps."""
        super().check_config(config, mode)
        d = config.distill
        require(config.model.decoder == "diffusion",
                "task='distill' needs model.decoder='diffusion' (a DGAE teacher)")
        require(bool(d.teacher), "distill.teacher is required: the teacher run's workdir")
        checks.run_workdir(d.teacher, "distill.teacher")
        checks.optional_step(config, "distill.teacher_step")
        checks.positive(config, "distill.teacher_steps")
        checks.one_of(d.teacher_sampler, diffusion.SAMPLERS, "distill.teacher_sampler")
        checks.one_of(d.teacher_spacing, diffusion.SPACINGS, "distill.teacher_spacing")
        checks.distinct_positive_ints(d.student_steps, "distill.student_steps")
        weights = ("mse_weight", "lpips_weight", "gt_mse_weight", "gt_lpips_weight")
        checks.not_negative(config, *(f"distill.{w}" for w in weights))
        require(sum(d[w] for w in weights) > 0,
                f"distill.{', distill.'.join(weights)} are all 0: nothing to train on")
        if mode == "sweep":
            checks.distinct_positive_ints(config.eval.sweep_teacher_steps,
                                          "eval.sweep_teacher_steps", at_least_one=False)

    @classmethod
    def load_trained(cls, config: ml_collections.ConfigDict, workdir: str,
                     mesh: jax.sharding.Mesh, step: int | None = None,
                     field: str = "eval.step") -> tuple[int, Autoencoder, dict]:
        """The student decoder of the run (its checkpoints hold nothing else) with its
        teacher's EMA encoder."""
        model = Autoencoder.from_config(config, with_lpips=False)
        step, student = runs.restore_ema(config, workdir, _decoder_init, model, mesh, step, field)
        _, teacher = load_teacher(config, mesh)
        return step, model, {"encoder": teacher["encoder"], "decoder": student["decoder"]}

    def pretrained_params(self) -> dict:
        return {}  # init_params already copies the teacher

    def sweep_settings(self) -> list[dict]:
        """The student's grid (the autoencoder's), then the teacher at eval.sweep_teacher_steps
        with its sampler and spacing, so both are on one plot."""
        d, e = self.config.distill, self.config.eval
        return [dict(s, decoder="student") for s in super().sweep_settings()] + [
            {"steps": int(n), "sampler": d.teacher_sampler, "spacing": d.teacher_spacing,
             "decoder": "teacher"} for n in e.sweep_teacher_steps]

    def executables(self, mesh: jax.sharding.Mesh, params) -> dict:
        """The autoencoder's evaluation step, decoding with the student."""
        teacher = parallel.abstract(self.model.teacher, parallel.replicated(mesh))
        student = dataclasses.replace(self.model, teacher=teacher).student(params)
        return eval_executable(self.config, self.model.autoencoder, mesh, student)

    def benchmark_names(self) -> tuple[str, ...]:
        return ()  # the train step only: the student's inference is the autoencoder's

    def benchmark_components(self, names, params, mesh: jax.sharding.Mesh, data) -> dict:
        return {}  # none (benchmark_names)

    def describe(self, param_totals: dict[str, int]) -> dict:
        d = self.config.distill
        return {"student_params": param_totals["decoder"],
                "latent_shape": list(self.model.autoencoder.latent_shape), "teacher": d.teacher,
                "teacher_step": self.teacher_step, "teacher_steps": d.teacher_steps,
                "student_steps": list(d.student_steps)}

    def evaluator(self, run: Run) -> "StudentEvaluator":
        return StudentEvaluator(self.config, run, self.inception_weights)


class StudentEvaluator:
    """The autoencoder's evaluation of the student (decoding at diffusion.sample_steps, its
    default student step count) paired with the teacher's encoder."""

    def __init__(self, config: ml_collections.ConfigDict, run: Run, inception_weights):
        self.distillation = run.model
        run = dataclasses.replace(run, model=run.model.autoencoder)
        self.inner = AutoencoderEvaluator(config, run, inception_weights)

    def evaluate(self, params, step: int, decoder: str = "student", **kwargs) -> dict[str, float]:
        """The student's metrics (or with decoder='teacher', the teacher's, for comparison)."""
        chosen = (self.distillation.student(params) if decoder == "student"
                  else self.distillation.teacher)
        return dict(self.inner.evaluate(chosen, step, **kwargs), decoder=decoder)


def teacher_run(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, int]:
    """(saved config, step) of a distillation's teacher (distill.teacher, at distill.teacher_step
    or its newest step), which must have been trained with the student's image size and model."""
    d = config.distill
    step, saved = runs.saved_config(d.teacher, d.teacher_step, "distill.teacher_step")
    ours = json.loads(config.to_json_best_effort())
    theirs = json.loads(saved.to_json_best_effort())
    for key in ("image_size", "model"):
        if ours[key] != theirs[key]:
            where = first_difference(theirs[key], ours[key], key)
            raise ConfigError(f"distill.teacher={d.teacher!r} was trained with {where}: the "
                              "student must have the teacher's networks (use its config variants)")
    return saved, step


def load_teacher(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> tuple[int, dict]:
    """(step, EMA {'encoder', 'decoder'} on `mesh`) of the teacher (a DGAE, or itself a
    student)."""
    teacher_config, step = teacher_run(config)
    task = DistillationTask if teacher_config.task == "distill" else AutoencoderTask
    step, _, params = task.load_trained(teacher_config, config.distill.teacher, mesh, step,
                                        "distill.teacher_step")
    return step, params


def first_difference(theirs, ours, path: str) -> str:
    """'model.unet.width=128, this config 64' for the first field where two JSON trees differ."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        for key in sorted(theirs.keys() | ours.keys()):
            if theirs.get(key) != ours.get(key):
                return first_difference(theirs.get(key), ours.get(key), f"{path}.{key}")
    return f"{path}={theirs!r}, this config {ours!r}"


def _plain(value):
    """A config value as its saved JSON reads back (tuples as lists), to compare the two."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return json.loads(json.dumps(value, default=list))


def _tuples(value):
    """A saved config value with the tuples its JSON turned into lists back (config files write
    tuples: the sections taken from a teacher then read as their config file wrote them)."""
    if isinstance(value, ml_collections.ConfigDict):
        return ml_collections.ConfigDict({k: _tuples(v) for k, v in value.items()})
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _decoder_init(model: Autoencoder, rng: jax.Array) -> dict:
    """The shapes of a distillation run's parameters: a decoder."""
    return {"decoder": model.init(rng)["decoder"]}
