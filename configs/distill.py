# A 1-step student of any trained DGAE run (dgae_jax/distill.py): its networks, image size, data
# and LPIPS net come from the teacher run's saved config; this file sets the recipe.
#   python -m dgae_jax.main --config=configs/distill.py --workdir=STUDENT \
#     --config.distill.teacher=TEACHER_RUN
#   python -m dgae_jax.main --config=configs/distill.py:demo --workdir=runs/demo_student \
#     --config.distill.teacher=runs/demo                  # the set-up demo's teacher
# Its checkpoints hold the student decoder; evaluation, --mode=sweep (the student at 1, 2, 4
# steps, the teacher at 1-25), reconstruct, export, dgae_jax.api and the DiT's sample.decoder use
# it with the teacher's encoder.
from dgae_jax import config_lib


def get_config(arg=None):
    return config_lib.distill_config(arg)
