# The README's first run: a small DGAE that trains on 2 CPU cores in about 15 minutes.
#   python -m dgae_jax.main --config=configs/demo.py --workdir=runs/demo
# 64 px crops of the photographs bundled with scikit-image (four held out for evaluation), 8x8x16
# latents: the f8 encoder with 16 channels, as at 64 px an f16 latent is 4x4, too coarse to bring
# held-out photos back recognisably within minutes. 1,800 steps of 8 images, evaluated at steps
# 900 and 1,800. Variants as configs/f8.py's (e.g. demo:decoder=conv for the SD-VAE baseline).
# The f16 demo (configs/f16.py:demo, 4x4x16 latents) is the teacher and latent source of the
# distillation and DiT demos.
from dgae_jax import config_lib


def get_config(arg=None):
    c = config_lib.autoencoder_config(8, ",".join(filter(None, ["demo", "c=16", arg])))
    c.name = c.name.replace("f8-demo", "demo")
    c.update(total_steps=1_800, eval_every=900, checkpoint_every=450)
    return c
