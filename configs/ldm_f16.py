# Class-conditional DiT-XL/1 on the latents of a DGAE f16 (c=16) autoencoder, ImageNet 256 px.
#   python -m dgae_jax.main --config=configs/f16.py --workdir=AE --mode=cache_latents \
#       --config.cache.dir=CACHE                      # once: encode ImageNet with the trained AE
#   python -m dgae_jax.main --config=configs/ldm_f16.py --workdir=LDM --config.cache.dir=CACHE
#   python -m dgae_jax.main --config=configs/ldm_f16.py --workdir=LDM --mode=sample \
#       --config.cache.dir=CACHE
# Expected (paper Table 3, 1M steps, no CFG, gFID-50k / sFID / precision / recall):
#   f16c16 DGAE 10.41 / 5.39 / 0.71 / 0.61; c=8: 11.16 / 5.43 / 0.69 / 0.62.
# Recipe: DiT's DDPM (linear betas, epsilon + learned variance, L_simple + L_vlb, 250 respaced
# ancestral steps), the one epsilon-VAE's generation table uses; gFID-50k against ADM's
# VIRTUAL_imagenet256_labeled.npz (--config.eval.fid_samples=50000 --config.eval.fid_reference=...).
# Variants after a colon: c=8 (the f16c8 cache), size=S|B|L|XL, patch=2, objective=rf (rectified
# flow, Heun 50), demo (a small DiT on the demo autoencoder's cache, CPU).
from dgae_jax import config_lib


def get_config(arg=None):
    return config_lib.ldm_config(arg)
