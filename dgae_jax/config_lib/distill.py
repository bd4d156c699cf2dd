"""The config of a 1-2 step student of any trained DGAE run (`configs/distill.py`).

The student's networks, image size, data and LPIPS net are the teacher's: this builder leaves
them at placeholder values (the f16 autoencoder's) that `DistillationTask.complete_config` (tasks/distill.py) replaces
with the teacher run's saved config once `distill.teacher` is known, before validation. What this
builder sets is the recipe: the schedule, optimiser, batch, the `distill` section, the student's
decode setting and the sweep grid.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from dgae_jax.config_lib.autoencoder import autoencoder_config
from dgae_jax.config_lib.common import parse_variants

VARIANTS = ("demo",)


def distill_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """A student of a trained DGAE (distill.py), with the variants of `arg` ('demo': the schedule
    measured on the set-up demo's teacher, docs/distillation.md)."""
    demo = "demo" in parse_variants(arg, VARIANTS)
    # Sections other than the recipe's: the autoencoder's (demo-sized for the demo), and the
    # teacher's once complete_config has run.
    c = autoencoder_config(16, "demo" if demo else None)
    c.task = "distill"
    c.name = "student"  # complete_config: '<teacher's name>-student'
    # Gap-fills: SSDD does not state a schedule we could copy at this scale.
    c.total_steps = 50_000
    c.eval_every = 5_000
    c.optimizer.update(lr=1e-4, end_lr=1e-5, warmup_steps=1_000)
    c.distill = dict(
        teacher="",  # the teacher run's workdir; required
        teacher_step=config_dict.placeholder(int),  # None = its latest checkpoint
        teacher_steps=25, teacher_sampler="euler", teacher_spacing="uniform",  # the target
        # Student step counts trained together (the loss averages over them).
        student_steps=(1,),
        # Against the teacher's decode from the same latent and noise (SSDD's terms) ...
        mse_weight=0.0, lpips_weight=0.0,
        # ... and against the image itself. Measured on the set-up demo's teacher
        # (docs/distillation.md): the image alone beat the teacher's target and the two
        # together, at half the time per step (the teacher is not run); not measured at
        # paper scale, where SSDD's mse_weight=1, lpips_weight=0.5 is the alternative.
        gt_mse_weight=1.0, gt_lpips_weight=0.5)
    c.diffusion.update(sample_steps=1, sampler="euler", spacing="uniform")
    c.eval.update(sweep_steps=(1, 2, 4), sweep_samplers=("euler",), sweep_spacings=("uniform",),
                  sweep_teacher_steps=(1, 2, 4, 8, 25))
    if demo:
        c.total_steps = 1_200
        c.eval_every = 600
        c.checkpoint_every = 300
        c.optimizer.update(lr=5e-4, end_lr=5e-5, warmup_steps=25)  # the teacher's; beat 2e-4
        # The demo teacher's sweep: Euler is within noise of its best from 4 steps.
        c.distill.teacher_steps = 4
    return c
