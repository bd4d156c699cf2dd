"""Distilling DGAE's diffusion decoder into a 1- or 2-step student, as pure functions.

DGAE decodes with many U-Net evaluations; a decoder trained to reach the teacher's many-step
result from the same noise and latent in one or two steps removes most of that cost (SSDD,
arXiv 2510.04961, distils a multi-step diffusion decoder into a single step with MSE + LPIPS
against the teacher's output).

Per batch: the teacher's frozen EMA encoder gives the posterior mean z of each image; one noise
draw n per image; the teacher's EMA decoder integrates the flow from n for `teacher_steps` steps
(its sampler and spacing) to the target; the student, a U-Net of the teacher's architecture
started from the teacher's EMA decoder, integrates from the same n in each of `student_steps`
(Euler, uniform: the config's diffusion sampler) and is trained on

    mean over k in student_steps of
        mse_weight * |x_k - target|^2 + lpips_weight * LPIPS(x_k, target)

(pixel means). The gradient flows through the student's whole k-step trajectory. Student
parameters are {'decoder'}; the teacher's {'encoder', 'decoder'} are frozen arrays of the
`Distillation` pytree, inputs of the jitted step like the LPIPS weights, never trained.
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
        """The loss above and its terms per student step count (`mse_1`, `lpips_2`, ...)."""
        del step
        ae, d = self.autoencoder, self.autoencoder.config.distill
        x = batch["image"].astype(jnp.float32)
        z = ae.encode(self.teacher, x).mean
        noise = jax.random.normal(rng, x.shape)
        target = self.target(z, noise)
        student = self.student(params)
        loss, metrics = jnp.zeros(()), {}
        for k in d.student_steps:
            out = ae.decode_from_noise(student, z, noise, k)
            metrics[f"mse_{k}"] = jnp.mean((out - target) ** 2)
            term = d.mse_weight * metrics[f"mse_{k}"]
            if d.lpips_weight > 0:
                metrics[f"lpips_{k}"] = ae.lpips_loss(out, target)
                term = term + d.lpips_weight * metrics[f"lpips_{k}"]
            loss = loss + term / len(d.student_steps)
        return loss, {"loss": loss, **metrics}
