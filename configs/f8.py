# DGAE f8 (latent (H/8, W/8, 4) by default) on ImageNet 256 px, the paper's settings.
#   python -m dgae_jax.main --config=configs/f8.py --workdir=RUN
# Expected (paper Table 2, ImageNet val; training length not stated): f8c4 rFID-5k 4.23, PSNR 25.73, SSIM 0.76 (SD-VAE baseline 4.91 / 24.60 / 0.74).
# Variants after a colon, comma-separated: c=8 (latent channels), size=M | size=L (decoder width
# 192 / 256, 276M / 491M params), decoder=conv (the SD-VAE baseline), res=128, demo (64 px, CPU).
#   python -m dgae_jax.main --config=configs/f8.py:demo --workdir=/tmp/demo
#   python -m dgae_jax.main --config=configs/f8.py --mode=summary
from dgae_jax import config_lib


def get_config(arg=None):
    return config_lib.autoencoder_config(8, arg)
