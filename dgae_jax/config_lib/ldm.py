"""The latent DiT's config that `configs/ldm_f16.py` exposes: DiT-XL/1 on a DGAE f16 latent
cache (paper section 4.3), DiT's DDPM recipe, and its variants."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from dgae_jax.config_lib.common import parse_variants, run_fields
from dgae_jax.errors import ConfigError

VARIANTS = ("c", "size", "patch", "objective", "demo")
# DiT paper Table 4: hidden size, depth, heads of DiT-S / B / L / XL.
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def ldm_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The latent DiT on a DGAE f16 latent cache: the paper's DiT-XL/1 (section 4.3)."""
    v = parse_variants(arg, VARIANTS)
    size = v.get("size", "XL")
    if size not in DIT_SIZES:
        raise ConfigError(f"size={size!r} is not one of {', '.join(DIT_SIZES)}")
    hidden, depth, heads = DIT_SIZES[size]

    c = ml_collections.ConfigDict()
    c.task = "ldm"
    c.name = f"ldm-f16-dit{size}"
    run_fields(c)
    c.batch_size = 256  # DiT's global batch
    c.total_steps = 1_000_000  # paper: 1M steps
    c.eval_every = 50_000
    c.checkpoint_every = 10_000
    c.checkpoint_keep_every = 100_000
    c.ema_decay = 0.9999
    # DiT: AdamW at a constant 1e-4, no weight decay, no warm-up, default betas, no clipping.
    c.optimizer = dict(lr=1e-4, end_lr=1e-4, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                       weight_decay=0.0, clip_norm=0.0)

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
    # (configs/distill.py) of that autoencoder, for 1-2 step decoding.
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
