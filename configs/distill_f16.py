# A 1-2 step student of a trained f16 DGAE (dgae_jax/distill.py): give the teacher's variants.
#   python -m dgae_jax.main --config=configs/distill_f16.py --workdir=STUDENT \
#     --config.distill.teacher=TEACHER_RUN
#   python -m dgae_jax.main --config=configs/distill_f16.py:demo --workdir=runs/demo_student \
#     --config.distill.teacher=runs/demo16                # on the f16 demo
# Its checkpoints hold the student decoder; evaluation, --mode=sweep (1, 2, 4 steps), reconstruct,
# export, dgae_jax.api and the DiT's sample.decoder use it with the teacher's encoder.
from dgae_jax import config_lib


def get_config(arg=None):
    return config_lib.distill_config(16, arg)
