"""Builds the autoencoder configs that `configs/f8.py`, `f16.py`, `f32.py` expose.

A config file calls `autoencoder_config(factor, arg)`, where `arg` is the text after the colon
in `--config=configs/f16.py:c=8,size=M`: comma-separated variants, each `key=value` or a bare
flag. Paper facts (arXiv 2506.09644) and our gap-fills, where the paper is silent, are marked where
set.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

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
LDM_VARIANTS = ("c", "size", "patch", "objective", "demo")
# DiT paper Table 4: hidden size, depth, heads of DiT-S / B / L / XL.
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def parse_variants(arg: str | None, known: tuple[str, ...] = VARIANTS) -> dict[str, str]:
    """'c=8,size=M,demo' -> {'c': '8', 'size': 'M', 'demo': ''}; unknown keys are an error."""
    out = {}
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, _, value = item.partition("=")
        if key not in known:
            raise ConfigError(f"unknown config variant {key!r}; known: {', '.join(known)}")
        out[key] = value
    return out


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` fields with their defaults (the paper's ImageNet recipe)."""
    return ml_collections.ConfigDict(dict(
        name="tfds:imagenet2012",   # "embedded" | "folder" | "tfds:<tfds name>"
        train_split="train",
        eval_split="validation",
        dir="",                     # folder root, or TFDS data_dir ("" -> TFDS_DATA_DIR / default)
        crop="resize_random",       # "resize_random" | "random_resized"
        min_scale=0.25,             # random_resized: smallest crop side / shorter image side
        flip=True,                  # random horizontal flips in training
        eval_subset="",             # fixed eval images: a named list ("imagenet_val_5k") or a
                                    # file of file names; "" = the eval split in its order
        eval_size=0,                # first N eval examples (of the subset); 0 = all of them
        eval_crops=8,               # embedded only: fixed eval crops per held-out photo ...
        eval_crop_seed=0,           # ... and the seed of their positions (another seed gives
                                    # other crops of the same photos, e.g. to choose settings)
        workers=0,                  # grain worker processes; 0 = threads in this process
        prefetch=2,                 # batches buffered ahead (threads) / per worker (processes)
        bad_images="skip",          # unreadable images: "skip" (replace, log, count) | "error"
        max_bad_fraction=0.001,     # "skip": stop when more of the train split is unreadable
    ))


def default_benchmark_config() -> ml_collections.ConfigDict:
    """`--mode=benchmark` (modes/benchmark.py): which components, how many timed calls, what batch."""
    return ml_collections.ConfigDict(dict(
        steps=10,            # timed calls of each component; 0 = compile and memory only
        components="",       # comma-separated, e.g. "unet,decode_25"; "" = all it has
        batch_size=0,        # global batch of the inference components; 0 = batch_size
        decode_steps=(1, 4, 25),  # DGAE decodes timed, in flow steps
    ))


def autoencoder_config(factor: int, arg: str | None = None) -> ml_collections.ConfigDict:
    v = parse_variants(arg)
    size = v.get("size", "B")
    if size not in UNET_WIDTH:
        raise ConfigError(f"size={size!r} is not one of {', '.join(UNET_WIDTH)}")
    decoder = v.get("decoder", "diffusion")
    if decoder not in ("diffusion", "conv"):
        raise ConfigError(f"decoder={decoder!r} is not 'diffusion' or 'conv'")

    c = ml_collections.ConfigDict()
    c.task = "autoencoder"
    c.name = f"f{factor}"
    c.seed = 0
    c.image_size = int(v.get("res", 256))
    c.batch_size = 96  # paper: global batch 96, "matching SD-VAE"
    c.total_steps = 500_000  # gap-fill: the paper does not state its AE iterations
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 5_000
    c.checkpoint_keep = 3  # the latest N ...
    c.checkpoint_keep_every = 50_000  # ... plus every K-th step
    c.ema_decay = 0.9999  # gap-fill: the paper does not state EMA
    c.profile_steps = ()  # (start, end): a jax.profiler trace of those steps in <workdir>/profile
    c.benchmark = default_benchmark_config()
    c.max_nonfinite_steps = 20  # non-finite steps in a row (each skipped) before the run stops
    c.restore_fallback = True  # a corrupt checkpoint: resume from the newest intact one

    # Paper section 4.1.
    c.optimizer = dict(lr=1e-4, end_lr=1e-5, warmup_steps=10_000, b1=0.9, b2=0.95, eps=1e-8,
                       weight_decay=0.1, clip_norm=1.0)
    # -1: all remaining devices; dcn_data: slices the data axis spans (multislice), fsdp stays
    # inside a slice.
    c.mesh = dict(data=-1, fsdp=1, dcn_data=1)
    c.sharding = dict(rules=((".*", "fsdp"),), min_fsdp_size=2**18)
    c.data = default_data_config()
    c.data.eval_subset = "imagenet_val_5k"  # rFID-5k: see docs/evaluation.md
    # tag: "" or a name that keeps this evaluation's files apart from the run's own
    # (eval/<step>-<tag>.json, images/<step>-<tag>.png, eval/sweep-<step>-<tag>.*).
    c.eval = dict(num_images=8, step=config_dict.placeholder(int), tag="",
                  rfid=True,  # FID of reconstructions vs inputs (needs converted weights)
                  inception_weights="",  # "" = models/inception.default_weights_path()
                  # --mode=sweep: every steps x sampler x spacing (choose on another split than
                  # the one reported; README "Choosing the decode setting")
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
    c.reconstruct = dict(input="", output="", step=config_dict.placeholder(int), seed=0,
                         grid_images=16)
    # --mode=export (modes/export.py): format 'dgae' (inference bundle for api.load) or, for
    # decoder=conv, 'diffusers' (an AutoencoderKL directory); dir must not exist yet.
    c.export = dict(dir="", step=config_dict.placeholder(int), format="dgae", stat_images=1024)
    # Start training from a diffusers AutoencoderKL directory (config.json +
    # diffusion_pytorch_model.safetensors, e.g. SD's public VAE with configs/f8.py):
    # encoder_from for the encoder, decoder_from for the conv baseline's decoder.
    c.init = dict(encoder_from="", decoder_from="")

    c.model = ml_collections.ConfigDict()
    c.model.spatial_factor = factor
    c.model.latent_channels = int(v.get("c", DEFAULT_CHANNELS[factor]))
    c.model.decoder = decoder  # 'diffusion' = DGAE, 'conv' = the SD-VAE baseline
    c.model.dtype = "bfloat16"  # compute dtype; parameters are always float32
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


def distill_config(factor: int, arg: str | None = None) -> ml_collections.ConfigDict:
    """A 1-2 step student of a trained DGAE (distill.py): the teacher's architecture (same
    variants as its config) plus the `distill` section; the student decodes in one step by
    default (diffusion.sample_steps), the sweep compares it at 1, 2 and 4."""
    c = autoencoder_config(factor, arg)
    if c.model.decoder != "diffusion":
        raise ConfigError("decoder=conv has no diffusion decoder to distil")
    c.task = "distill"
    c.name += "-student"
    # Gap-fills: SSDD does not state a schedule we could copy at this scale.
    c.total_steps = 50_000
    c.eval_every = 5_000
    c.optimizer.update(lr=1e-4, end_lr=1e-5, warmup_steps=1_000)
    c.distill = dict(
        teacher="",  # the teacher run's workdir; required
        teacher_step=config_dict.placeholder(int),  # None = its latest checkpoint
        teacher_steps=25, teacher_sampler="euler", teacher_spacing="uniform",  # the target
        student_steps=(1, 2),  # trained together: the loss averages over them
        mse_weight=1.0, lpips_weight=0.5)  # SSDD's terms; eta as in the autoencoder loss
    c.diffusion.update(sample_steps=1, sampler="euler", spacing="uniform")
    c.eval.update(sweep_steps=(1, 2, 4), sweep_samplers=("euler",), sweep_spacings=("uniform",),
                  sweep_teacher_steps=(1, 2, 4, 8, 25))
    if "demo" in parse_variants(arg):
        c.name = "f16-demo-student"
        c.total_steps = 600
        c.eval_every = 300
        c.checkpoint_every = 300
        c.optimizer.update(lr=2e-4, end_lr=2e-5, warmup_steps=25)
        # The demo teacher's sweep: Euler is within noise of its 25-step figures from 4 steps.
        c.distill.teacher_steps = 4
    return c


def ldm_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The latent DiT on a DGAE f16 latent cache: the paper's DiT-XL/1 (section 4.3)."""
    v = parse_variants(arg, LDM_VARIANTS)
    size = v.get("size", "XL")
    if size not in DIT_SIZES:
        raise ConfigError(f"size={size!r} is not one of {', '.join(DIT_SIZES)}")
    hidden, depth, heads = DIT_SIZES[size]

    c = ml_collections.ConfigDict()
    c.task = "ldm"
    c.name = f"ldm-f16-dit{size}"
    c.seed = 0
    c.batch_size = 256  # DiT's global batch
    c.total_steps = 1_000_000  # paper: 1M steps
    c.log_every = 100
    c.eval_every = 50_000
    c.checkpoint_every = 10_000
    c.checkpoint_keep = 3
    c.checkpoint_keep_every = 100_000
    c.ema_decay = 0.9999
    c.profile_steps = ()  # (start, end): a jax.profiler trace of those steps in <workdir>/profile
    c.benchmark = default_benchmark_config()
    c.max_nonfinite_steps = 20  # non-finite steps in a row (each skipped) before the run stops
    c.restore_fallback = True  # a corrupt checkpoint: resume from the newest intact one
    # DiT: AdamW at a constant 1e-4, no weight decay, no warm-up, default betas, no clipping.
    c.optimizer = dict(lr=1e-4, end_lr=1e-4, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                       weight_decay=0.0, clip_norm=0.0)
    c.mesh = dict(data=-1, fsdp=1, dcn_data=1)
    c.sharding = dict(rules=((".*", "fsdp"),), min_fsdp_size=2**18)

    # The latent cache (made by --mode=cache_latents) and how latents are drawn from it.
    # latent: 'sample' | 'mean'; verify: hash every shard when opening (one read of the cache).
    c.cache = dict(dir="", latent="sample", flip=True, verify=True)

    c.model = ml_collections.ConfigDict()
    c.model.size = size
    c.model.hidden, c.model.depth, c.model.heads = hidden, depth, heads
    c.model.patch_size = int(v.get("patch", 1))  # paper: DiT-XL/1
    c.model.latent_size = 16  # f16 at 256 px; must match the cache
    c.model.latent_channels = int(v.get("c", 16))
    c.model.num_classes = 1000
    c.model.label_dropout = 0.1  # classifier-free guidance training
    c.model.dtype = "bfloat16"

    # 'ddpm': DiT's recipe, which the paper's Table 3 follows through epsilon-VAE (linear betas
    # 1e-4..0.02 over 1000 steps, epsilon + learned variance, L_simple + L_vlb, 250 respaced
    # ancestral steps). 'rf' (variant objective=rf): rectified flow, logit-normal t, Heun-50.
    c.diffusion = ml_collections.ConfigDict()
    objective = v.get("objective", "ddpm")
    if objective not in ("ddpm", "rf"):
        raise ConfigError(f"objective={objective!r} is not one of ddpm, rf")
    c.diffusion.objective = objective
    c.diffusion.num_timesteps = 1000  # ddpm only
    c.diffusion.beta_start, c.diffusion.beta_end = 1e-4, 0.02  # ddpm only (scaled by 1000/T)
    c.diffusion.time_sampling = "logit_normal"  # rf only; or 'uniform'
    c.diffusion.time_loc = 0.0  # rf only
    c.diffusion.time_scale = 1.0  # rf only
    c.diffusion.sample_steps = 250 if objective == "ddpm" else 50
    c.diffusion.sampler = "ddpm" if objective == "ddpm" else "heun"  # ddpm | euler, heun
    c.diffusion.spacing = "uniform"  # ddpm: ADM's even respacing; rf: or 'reversed_log'
    c.diffusion.guidance = 1.0  # paper: no CFG

    # --mode=sample, and the evaluation during training.
    # decoder: "" decodes with the cache's autoencoder; or a distilled student's workdir
    # (configs/distill_f16.py) of that autoencoder, for 1-2 step decoding.
    c.sample = dict(num=64, classes=(), seed=0, step=config_dict.placeholder(int), decoder="")
    c.eval = dict(num_images=16, fid_samples=5_000, fid_reference="", inception_weights="",
                  step=config_dict.placeholder(int), tag="")
    c.data = dict(workers=0, prefetch=2)

    if "demo" in v:
        _shrink_ldm_to_demo(c)
    return c


def _shrink_ldm_to_demo(c: ml_collections.ConfigDict) -> None:
    """A small DiT on the demo autoencoder's cache (4x4x16 latents of 32 crops of each of the
    15 training photos; the class is the photo)."""
    c.name = "ldm-demo"
    c.batch_size = 32
    c.total_steps = 2_000
    c.log_every = 50
    c.eval_every = 1_000
    c.checkpoint_every = 500
    c.checkpoint_keep_every = 0
    c.ema_decay = 0.999
    c.optimizer.update(lr=3e-4, end_lr=3e-5, warmup_steps=100)
    # Labels are photo indices into sources.EmbeddedPhotos.PHOTOS (19); the 15 training photos
    # are the classes that occur in the cache.
    c.model.update(size="demo", hidden=128, depth=4, heads=4, latent_size=4, num_classes=19,
                   dtype="float32")
    if c.diffusion.objective == "rf":
        c.diffusion.sample_steps = 20
    c.sample.num = 15
    c.sample.classes = (0, 1, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14, 15, 16, 18)
    c.eval.update(num_images=15, fid_samples=64)
