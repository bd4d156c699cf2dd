"""The autoencoder configs that `configs/f8.py`, `f16.py`, `f32.py` expose: DGAE, or with
decoder=conv the SD-VAE baseline. Paper facts (arXiv 2506.09644) and our gap-fills, where the
paper is silent, are marked where set."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from dgae_jax.config_lib.common import default_data_config, parse_variants, run_fields
from dgae_jax.errors import ConfigError

# SD-VAE encoder levels per spatial factor (CompVis latent-diffusion configs; f16 adds
# one level to the f8 layout).
ENCODER_CHANNEL_MULT = {8: (1, 2, 4, 4), 16: (1, 1, 2, 2, 4), 32: (1, 1, 2, 2, 4, 4)}
# Self-attention inside the encoder/conv-decoder levels at these feature sizes (CompVis).
ENCODER_ATTN = {8: (), 16: (16,), 32: (16, 8)}
# Latent channels the paper pairs with each factor for a 4096-d latent at 256 px.
DEFAULT_CHANNELS = {8: 4, 16: 16, 32: 64}
# U-Net base width of DGAE-B / M / L (paper Table 1: 122M / 276M / 491M decoders).
UNET_WIDTH = {"B": 128, "M": 192, "L": 256}

VARIANTS = ("c", "size", "decoder", "width", "blocks", "res", "demo")


def autoencoder_config(factor: int, arg: str | None = None) -> ml_collections.ConfigDict:
    """The f`factor` autoencoder at the paper's settings, with the variants of `arg` (see
    configs/f16.py)."""
    v = parse_variants(arg, VARIANTS)
    size = v.get("size", "B")
    if size not in UNET_WIDTH:
        raise ConfigError(f"size={size!r} is not one of {', '.join(UNET_WIDTH)}")
    decoder = v.get("decoder", "diffusion")
    if decoder not in ("diffusion", "conv"):
        raise ConfigError(f"decoder={decoder!r} is not 'diffusion' or 'conv'")

    c = ml_collections.ConfigDict()
    c.task = "autoencoder"
    c.name = f"f{factor}"
    run_fields(c)
    c.image_size = int(v.get("res", 256))
    c.batch_size = 96  # paper: global batch 96, "matching SD-VAE"
    c.total_steps = 500_000  # gap-fill: the paper does not state its AE iterations
    c.eval_every = 10_000
    c.checkpoint_every = 5_000
    c.checkpoint_keep_every = 50_000  # ... plus every K-th step
    c.ema_decay = 0.9999  # gap-fill: the paper does not state EMA
    # Paper section 4.1.
    c.optimizer = dict(lr=1e-4, end_lr=1e-5, warmup_steps=10_000, b1=0.9, b2=0.95, eps=1e-8,
                       weight_decay=0.1, clip_norm=1.0)
    c.data = default_data_config()
    c.data.eval_subset = "imagenet_val_5k"  # rFID-5k: see docs/evaluation.md
    # tag: "" or a name that keeps this evaluation's files apart from the run's own
    # (eval/<step>-<tag>.json, images/<step>-<tag>.png, eval/sweep-<step>-<tag>.*).
    c.eval = dict(num_images=8, step=config_dict.placeholder(int), tag="",
                  rfid=True,  # FID of reconstructions vs inputs (needs converted weights)
                  inception_weights="",  # "" = models/inception.default_weights_path()
                  # --mode=sweep: every steps x sampler x spacing (choose on another split than
                  # the one reported; docs/decoding.md)
                  sweep_steps=(1, 2, 4, 8, 16, 25, 50),
                  sweep_samplers=("euler", "heun"),
                  sweep_spacings=("uniform", "reversed_log"))
    # --mode=cache_latents (cache/job.py): encode splits once with the EMA encoder.
    c.cache = dict(
        dir="",  # output directory, local or bucket; required
        step=config_dict.placeholder(int),  # checkpoint step; None = the latest
        splits=("train", "eval"),  # roles: data.train_split and data.eval_split, all examples
        dtype="bfloat16",  # stored latents: bfloat16 | float16 | float32
        flip=True,  # also store the posterior of the horizontally flipped image
        crops_per_image=1,  # train role: 1 = the eval view; k > 1 = k fixed crops per image
        batch_size=256,  # global; split over every device
        examples_per_shard=1024,
        read_threads=16,  # grain threads decoding images ahead of the device
        benchmark=0,  # N > 0: time caching N train images against the encoder alone instead
    )
    # --mode=reconstruct (modes/reconstruct.py): your images through a trained run. input: an image
    # or a folder; output: a directory (PNGs, comparison.png, metrics.json).
    # tile: None = tile images larger than image_size, 0 = never, N = N-pixel tiles; dtype:
    # None = model.dtype, or float32 | bfloat16 | float16 (api.load's dtype).
    c.reconstruct = dict(input="", output="", step=config_dict.placeholder(int), seed=0,
                         grid_images=16, tile=config_dict.placeholder(int),
                         dtype=config_dict.placeholder(str))
    # --mode=export (modes/export.py): format 'dgae' (inference bundle for api.load) or, for
    # decoder=conv, 'diffusers' (an AutoencoderKL directory); dir must not exist yet.
    c.export = dict(dir="", step=config_dict.placeholder(int), format="dgae", stat_images=1024)
    # Start training from pretrained weights. encoder_from: a diffusers AutoencoderKL directory
    # (config.json + diffusion_pytorch_model.safetensors, e.g. SD's public VAE with
    # configs/f8.py), one of our autoencoder runs or an exported bundle; decoder_from: a diffusers
    # directory for the conv baseline's decoder. freeze_encoder: the encoder never trains (no
    # gradient, optimiser state, EMA update or KL term): the decoder learns to decode exactly
    # the latents it gives (configs/sd_decoder.py).
    c.init = dict(encoder_from="", decoder_from="", freeze_encoder=False)

    c.model = ml_collections.ConfigDict()
    c.model.spatial_factor = factor
    c.model.latent_channels = int(v.get("c", DEFAULT_CHANNELS[factor]))
    c.model.decoder = decoder  # 'diffusion' = DGAE, 'conv' = the SD-VAE baseline
    c.model.dtype = "bfloat16"  # compute dtype; parameters are always float32
    # SD's latent convention: scaled latents = latents * scaling_factor (api's scaled=True).
    # None: taken from init.encoder_from when it declares one (0.18215 for SD 1.x/2.x's VAE).
    c.model.scaling_factor = config_dict.placeholder(float)
    c.model.norm_groups = 32
    c.model.encoder = dict(width=128, channel_mult=ENCODER_CHANNEL_MULT[factor],
                           num_res_blocks=2, attn_resolutions=ENCODER_ATTN[factor])
    # ADM U-Net; channel_mult () means ADM's table for image_size (1,1,2,2,4,4 at 256 px).
    # remat: 'none' | 'attention' | 'blocks' (models/unet.py); attention: None (JAX's choice)
    # | 'xla' | 'cudnn' (NVIDIA GPUs).
    c.model.unet = dict(width=UNET_WIDTH[size], channel_mult=(), num_res_blocks=2,
                        attn_resolutions=(16, 8), head_channels=64, time_scale=1000.0,
                        remat="none", attention=config_dict.placeholder(str))
    c.model.conv_decoder = dict(width=128, channel_mult=ENCODER_CHANNEL_MULT[factor],
                                num_res_blocks=2, attn_resolutions=ENCODER_ATTN[factor])
    c.model.discriminator = dict(width=64, num_layers=3)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.time_sampling = "logit_normal"  # gap-fill (epsilon-VAE); or 'uniform'
    c.diffusion.time_loc = 0.0
    c.diffusion.time_scale = 1.0
    c.diffusion.sample_steps = 25  # gap-fill: the paper does not state its decode steps
    c.diffusion.sampler = "euler"  # 'euler' | 'heun'
    c.diffusion.spacing = "uniform"  # 'uniform' | 'reversed_log'

    c.loss = ml_collections.ConfigDict()
    c.loss.velocity_weight = 1.0  # alpha (gap-fill)
    c.loss.kl_weight = 1e-6  # beta, on the per-image KL sum (SD-VAE's convention)
    # What the decoder trains on: 'sample' (z ~ q(z|x), as SD-VAE's decoder and the latent
    # diffusion models that use it are trained) or 'mean' (the posterior mean).
    c.loss.latents = "sample"
    c.loss.lpips_weight = 0.5  # eta (gap-fill, epsilon-VAE's value)
    c.loss.lpips_net = "vgg16"  # the paper's choice; 'alexnet' is ~15x cheaper
    c.loss.l1_weight = 1.0  # conv baseline only
    c.loss.gan_weight = 0.0  # conv baseline only; > 0 enables the PatchGAN
    c.loss.gan_start = 50_001  # CompVis disc_start
    if decoder == "conv":  # SD-VAE's loss: L1 + LPIPS(1.0) + KL + adaptive PatchGAN(0.5)
        c.loss.lpips_weight = 1.0
        c.loss.gan_weight = 0.5

    if "demo" in v:
        _shrink_to_demo(c, factor)
    # The decoder's shape at any scale (after the demo's): base width and residual blocks per
    # level of the U-Net (DGAE) or of the conv decoder (decoder=conv), e.g. to set the two
    # decoders' parameter ratio. At equal width and blocks the paper-scale U-Net has 2.5x the
    # conv decoder's parameters (DGAE-B 122M against SD-VAE's 49M).
    shape = c.model.unet if decoder == "diffusion" else c.model.conv_decoder
    for key, field in (("width", "width"), ("blocks", "num_res_blocks")):
        if key in v:
            if not v[key].isdigit() or int(v[key]) < 1:
                raise ConfigError(f"{key}={v[key]!r} is not a positive integer")
            shape[field] = int(v[key])
    return c


def _shrink_to_demo(c: ml_collections.ConfigDict, factor: int) -> None:
    """A 64 px model small enough to train on a laptop CPU."""
    c.name += "-demo"
    c.image_size = 64
    c.batch_size = 8
    c.total_steps = 3_000
    c.log_every = 50
    c.eval_every = 1_000
    c.checkpoint_every = 500
    c.checkpoint_keep_every = 0
    c.cache.batch_size = 32
    c.cache.crops_per_image = 32  # 15 photos -> 480 training latents, classes = photos
    c.cache.examples_per_shard = 64  # several shards even for the demo's 512 images
    c.ema_decay = 0.999
    c.optimizer.lr = 5e-4
    c.optimizer.end_lr = 5e-5
    c.optimizer.warmup_steps = 200
    c.data.name = "embedded"
    c.data.eval_subset = ""
    c.data.crop = "random_resized"  # 15 training photos: varied crops matter
    c.data.min_scale = 0.15
    c.model.dtype = "float32"  # bfloat16 is emulated (slow) on CPUs
    c.model.norm_groups = 8
    c.model.encoder.width = 32
    c.model.encoder.num_res_blocks = 1
    c.model.encoder.attn_resolutions = ()
    c.model.unet.width = 16
    c.model.unet.channel_mult = (1, 2, 2, 4)
    c.model.unet.num_res_blocks = 1
    c.model.unet.attn_resolutions = (8,)
    c.model.unet.head_channels = 32
    c.model.conv_decoder.width = 32
    c.model.conv_decoder.num_res_blocks = 1
    c.model.conv_decoder.attn_resolutions = ()
    c.model.discriminator.width = 32
    c.diffusion.sample_steps = 10
    c.loss.lpips_net = "alexnet"
    c.loss.gan_start = 2_000
