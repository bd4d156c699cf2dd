# A DGAE diffusion decoder for latents people already have: f8 c=4 (Stable Diffusion's layout) at
# 256 px, trained on a frozen encoder, so that it decodes exactly the latents that encoder gives
# (those of SD's public VAE, stabilityai/sd-vae-ft-mse, and of every latent dataset and latent
# diffusion model built on it). The encoder never trains: no gradient, no optimiser state, no EMA
# update, no KL term; it is saved as loaded. The decoder trains on posterior samples, as SD's
# decoder and SD's latent diffusion were trained (--config.loss.latents=mean for the means).
#   python -m dgae_jax.main --config=configs/sd_decoder.py --workdir=RUN \
#     --config.init.encoder_from=PATH/sd-vae-ft-mse     # a diffusers AutoencoderKL directory
# init.encoder_from may also be one of our autoencoder runs or an exported bundle. SD's
# scaling_factor (0.18215) comes from the directory's config.json: api.load(RUN).decode(
# latents_from_an_SD_pipeline, scaled=True). Variants as configs/f8.py's (size=M|L, width=N,
# blocks=N, res=N, demo); `demo` is 64 px on CPU, for the encoder of the f8 demo:
#   python -m dgae_jax.main --config=configs/sd_decoder.py:demo --workdir=/tmp/dec \
#     --config.init.encoder_from=runs/f8-demo-conv
from dgae_jax import config_lib


def get_config(arg=None):
    c = config_lib.autoencoder_config(8, arg)
    c.name = c.name.replace("f8", "sd-decoder", 1)
    c.init.freeze_encoder = True  # init.encoder_from is required (checked at start)
    return c
