# DGAE f32 (latent (H/32, W/32, 64) by default) on ImageNet 256 px, the paper's settings.
#   python -m dgae_jax.main --config=configs/f32.py --workdir=RUN
# Expected (paper Table 2, ImageNet val; training length not stated): f32c64 rFID-5k 5.14, PSNR 23.07, SSIM 0.73 (SD-VAE 9.07 / 22.26 / 0.69).
# Variants after a colon, comma-separated: c=8 (latent channels), size=M | size=L (decoder width
# 192 / 256, 276M / 491M params), decoder=conv (the SD-VAE baseline), res=128, demo (64 px, CPU).
#   python -m dgae_jax.main --config=configs/f32.py:demo --workdir=/tmp/demo
#   python -m dgae_jax.main --config=configs/f32.py --mode=summary
from dgae_jax import config_lib


def get_config(arg=None):
    return config_lib.autoencoder_config(32, arg)
