# DGAE f16 (latent (H/16, W/16, 16) by default) on ImageNet 256 px, the paper's settings.
#   python -m dgae_jax.main --config=configs/f16.py --workdir=RUN
# Expected (paper Table 2, ImageNet val; training length not stated): f16c16 rFID-5k 3.98, PSNR 25.33, SSIM 0.76; c=8: 4.99 / 24.46 / 0.74 (SD-VAE 4.62 / 23.90).
# Variants after a colon, comma-separated: c=8 (latent channels), size=M | size=L (decoder width
# 192 / 256, 276M / 491M params), decoder=conv (the SD-VAE baseline), res=128, demo (64 px, CPU).
#   python -m dgae_jax.main --config=configs/f16.py:demo --workdir=/tmp/demo
#   python -m dgae_jax.main --config=configs/f16.py --mode=summary
from dgae_jax import config_lib


def get_config(arg=None):
    return config_lib.autoencoder_config(16, arg)
