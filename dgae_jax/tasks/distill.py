"""The distillation task (distill.py): a 1- or 2-step student of a trained DGAE, on the shared
trainer.

It is the autoencoder task with another model (whose `init` and `loss_fn` the inherited
`init_params` and `loss_fn` call): the same images, batch spec, bad-image
policy and evaluation. Its config is the teacher's architecture (`configs/distill_f16.py`, same
variants as the teacher's) plus a `distill` section; `distill.teacher` names the teacher's run,
whose saved config must have the same model and image size (checked when the task starts). Its
checkpoints hold the student decoder only: evaluation, the sweep, reconstruct, export, the API
and the DiT's decoding pair it with the teacher's EMA encoder (inference.load_autoencoder), so a
student decodes the teacher's latents, a latent cache made with the teacher included.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from dgae_jax import inference, parallel
from dgae_jax.distill import Distillation
from dgae_jax.metrics import lpips
from dgae_jax.tasks.ae import AutoencoderEvaluator, AutoencoderTask
from dgae_jax.tasks.base import Run


class DistillationTask(AutoencoderTask):
    modes = ("train", "eval", "sweep", "reconstruct", "export")

    def __init__(self, config: ml_collections.ConfigDict, mode: str = "train"):
        """Loads the teacher's EMA parameters onto the config's mesh (replicated: they are part
        of the model pytree), after checking its networks are the student's."""
        super().__init__(config, mode)  # LPIPS and the FID Inception as the autoencoder's
        ae = self.model
        if config.distill.lpips_weight > 0 and ae.lpips_weights is None:
            ae = dataclasses.replace(ae, lpips_weights=lpips.load_weights(config.loss.lpips_net))
        teacher_config, step = inference.teacher_run(config)
        config.distill.teacher_step = step  # saved with each checkpoint: the student's teacher
        mesh = parallel.make_mesh(config.mesh)
        self.teacher_step, _, teacher = inference.load_autoencoder(
            teacher_config, config.distill.teacher, mesh, step, "distill.teacher_step")
        self.model = Distillation(ae, jax.device_put(teacher, parallel.replicated(mesh)))

    def pretrained_params(self) -> dict:
        return {}  # init_params already copies the teacher

    def describe(self, param_totals: dict[str, int]) -> dict:
        d = self.config.distill
        return {"student_params": param_totals["decoder"], "teacher": d.teacher,
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
