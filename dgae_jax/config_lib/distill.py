"""The config of a 1-2 step student of a trained DGAE (`configs/distill_f16.py`)."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from dgae_jax.config_lib.autoencoder import VARIANTS, autoencoder_config
from dgae_jax.config_lib.common import parse_variants
from dgae_jax.errors import ConfigError


def distill_config(factor: int, arg: str | None = None) -> ml_collections.ConfigDict:
    """A 1-2 step student of a trained DGAE (distill.py): the teacher's architecture (same
    variants as its config) plus the `distill` section; the student decodes in one step by
    default (diffusion.sample_steps), the sweep compares it at 1, 2 and 4."""
    c = autoencoder_config(factor, arg)
    if c.model.decoder != "diffusion":
        raise ConfigError("decoder=conv has no diffusion decoder to distil")
    c.task = "distill"
    c.name += "-student"
    # Gap-fills: SSDD does not state a schedule we could copy at this scale.
    c.total_steps = 50_000
    c.eval_every = 5_000
    c.optimizer.update(lr=1e-4, end_lr=1e-5, warmup_steps=1_000)
    c.distill = dict(
        teacher="",  # the teacher run's workdir; required
        teacher_step=config_dict.placeholder(int),  # None = its latest checkpoint
        teacher_steps=25, teacher_sampler="euler", teacher_spacing="uniform",  # the target
        student_steps=(1, 2),  # trained together: the loss averages over them
        mse_weight=1.0, lpips_weight=0.5)  # SSDD's terms; eta as in the autoencoder loss
    c.diffusion.update(sample_steps=1, sampler="euler", spacing="uniform")
    c.eval.update(sweep_steps=(1, 2, 4), sweep_samplers=("euler",), sweep_spacings=("uniform",),
                  sweep_teacher_steps=(1, 2, 4, 8, 25))
    if "demo" in parse_variants(arg, VARIANTS):
        c.name = "f16-demo-student"
        c.total_steps = 600
        c.eval_every = 300
        c.checkpoint_every = 300
        c.optimizer.update(lr=2e-4, end_lr=2e-5, warmup_steps=25)
        # The demo teacher's sweep: Euler is within noise of its 25-step figures from 4 steps.
        c.distill.teacher_steps = 4
    return c
