"""Distilling DGAE's diffusion decoder into a 1- or 2-step student, as pure functions.

DGAE decodes with many U-Net evaluations; a decoder trained to reach the teacher's many-step
result from the same noise and latent in one or two steps removes most of that cost (SSDD,
arXiv 2510.04961, distils a multi-step diffusion decoder into a single step with MSE + LPIPS
against the teacher's output).

Per batch: the teacher's frozen EMA encoder gives the posterior mean z of each image x; one
noise draw n per image; the teacher's EMA decoder integrates the flow from n for `teacher_steps`
steps (its sampler and spacing) to the target; the student, a U-Net of the teacher's architecture
started from the teacher's EMA decoder, integrates from the same n in each of `student_steps`
(Euler, uniform: the config's diffusion sampler) to x_k and is trained on

    mean over k in student_steps of
        mse_weight * |x_k - target|^2 + lpips_weight * LPIPS(x_k, target)
      + gt_mse_weight * |x_k - x|^2 + gt_lpips_weight * LPIPS(x_k, x)

(pixel means; the teacher is not run when both teacher weights are 0). The first two terms ask
for the teacher's sample from this noise, whose detail the image need not have; the last two ask
for the image, which a 1-step map can approach only by its conditional mean (MSE) sharpened by
LPIPS. Every step logs the student's MSE against both, and the target's against the image, so a
flat PSNR shows whether the student misses the teacher or the teacher misses the image. The
gradient flows through the student's whole k-step trajectory. Student parameters are
{'decoder'}; the teacher's {'encoder', 'decoder'} are frozen arrays of the `Distillation` pytree,
inputs of the jitted step like the LPIPS weights, never trained.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dgae_jax.autoencoder import Autoencoder


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Distillation:
    autoencoder: Autoencoder  # the student's architecture and config, with LPIPS weights
    teacher: Any  # the teacher's EMA parameters {'encoder', 'decoder'}, frozen

    def init(self, rng: jax.Array) -> dict:
        """The student starts as the teacher's EMA decoder (a copy: params are donated)."""
        del rng
        return {"decoder": jax.tree.map(jnp.copy, self.teacher["decoder"])}

    def student(self, params: dict) -> dict:
        """Autoencoder parameters that decode with the student: the teacher's encoder."""
        return {"encoder": self.teacher["encoder"], "decoder": params["decoder"]}

    def target(self, z: jax.Array, noise: jax.Array) -> jax.Array:
        d = self.autoencoder.config.distill
        x = self.autoencoder.decode_from_noise(self.teacher, z, noise, d.teacher_steps,
                                               d.teacher_sampler, d.teacher_spacing)
        return jax.lax.stop_gradient(x)

    def loss_fn(self, params: dict, batch: dict, rng: jax.Array,
                step: jax.Array | int = 0) -> tuple[jax.Array, dict]:
        """The loss above and its terms per student step count: `mse_1`, `lpips_1` against the
        teacher, `gt_mse_1`, `gt_lpips_1` against the image (LPIPS where weighted), and
        `teacher_gt_mse`, the target's MSE against the image."""
        del step
        ae, d = self.autoencoder, self.autoencoder.config.distill
        x = batch["image"].astype(jnp.float32)
        z = ae.encode(self.teacher, x).mean
        noise = jax.random.normal(rng, x.shape)
        references, metrics = {"gt_": (x, d.gt_mse_weight, d.gt_lpips_weight)}, {}
        if d.mse_weight > 0 or d.lpips_weight > 0:
            target = self.target(z, noise)
            references[""] = (target, d.mse_weight, d.lpips_weight)
            metrics["teacher_gt_mse"] = jnp.mean((target - x) ** 2)
        student = self.student(params)
        loss = jnp.zeros(())
        for k in d.student_steps:
            out = ae.decode_from_noise(student, z, noise, k)
            for prefix, (reference, mse_weight, lpips_weight) in references.items():
                metrics[f"{prefix}mse_{k}"] = jnp.mean((out - reference) ** 2)
                term = mse_weight * metrics[f"{prefix}mse_{k}"]
                if lpips_weight > 0:
                    metrics[f"{prefix}lpips_{k}"] = ae.lpips_loss(out, reference)
                    term = term + lpips_weight * metrics[f"{prefix}lpips_{k}"]
                loss = loss + term / len(d.student_steps)
        return loss, {"loss": loss, **metrics}
