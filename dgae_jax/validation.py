"""One check of a (config, mode) before any file, device or network work: every field that can be
judged from the config (and the device and process counts) is judged here, so a bad value stops
the run at start with one line naming the field, never hours in. Checks that need the data
itself (a split's size, a corrupt file) stay where the data is read.
"""

from __future__ import annotations

import math
import os
import re

import ml_collections

from dgae_jax import ddpm, diffusers_io, diffusion
from dgae_jax.cache import format
from dgae_jax.data import bad_images, pipeline, sources
from dgae_jax.errors import ConfigError
from dgae_jax.ldm import OBJECTIVES
from dgae_jax.metrics import lpips
from dgae_jax.models.unet import ADM_CHANNEL_MULT, REMAT
from dgae_jax.tasks import registry

# Modes that read a trained run's checkpoints from --workdir, or write into it.
WORKDIR_MODES = ("train", "eval", "cache_latents", "sample", "sweep", "reconstruct", "export")
ONE_PROCESS_MODES = ("reconstruct", "export")  # per-image work, files written by one process
EXPORT_FORMATS = ("dgae", "diffusers")
DTYPES = ("float32", "bfloat16", "float16")
CACHE_DTYPES = tuple(format.DTYPES)
CACHE_ROLES = ("train", "eval")
LATENT_MODES = ("sample", "mean")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(config, *fields: str) -> None:
    for field in fields:
        node, *path = field.split(".")
        value = config[node]
        for p in path:
            value = value[p]
        _require(value > 0, f"{field}={value} must be positive")


def _one_of(value, allowed, field: str) -> None:
    _require(value in allowed, f"{field}={value!r} is not one of {', '.join(map(str, allowed))}")


def _file(path: str, field: str) -> None:
    _require(os.path.isfile(path) or "://" in path, f"{field}={path!r}: no such file")


def validate(config: ml_collections.ConfigDict, mode: str, *, workdir: str | None = None,
             device_count: int | None = None, process_count: int = 1) -> None:
    """Raises ConfigError naming the first bad field. `device_count` and `process_count` (known
    once the distributed runtime is up) check the mesh and the batch split."""
    registry.task_class(config, mode)
    if mode in WORKDIR_MODES:
        _require(bool(workdir), f"--workdir is required for --mode={mode}")
        _writable(workdir, "--workdir")
    _training(config, device_count, process_count)
    tag = config.eval.get("tag", "")
    _require(isinstance(tag, str) and re.fullmatch(r"[A-Za-z0-9_.-]*", tag) is not None,
             f"eval.tag={tag!r} must be letters, digits, '_', '.' or '-' (it names files)")
    if config.task in ("autoencoder", "distill"):
        _autoencoder(config)
        _data(config)
        if config.task == "distill":
            _distill(config)
        if (mode in ("train", "eval", "sweep") and config.eval.rfid
                and config.eval.inception_weights):
            _file(config.eval.inception_weights, "eval.inception_weights")
        if mode == "sweep":
            _sweep(config)
        if mode == "cache_latents":
            _cache_job(config, device_count)
        if mode == "reconstruct":
            _reconstruct(config)
        if mode == "export":
            _export(config)
        if mode == "train":
            _init(config)
        _require(mode not in ONE_PROCESS_MODES or process_count == 1,
                 f"--mode={mode} runs in one process (it has {process_count}); it uses every "
                 "device of that process")
    else:
        _ldm(config, mode)


def _training(config, device_count: int | None, process_count: int) -> None:
    _positive(config, "total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
              "checkpoint_keep", "max_nonfinite_steps")
    _require(config.checkpoint_keep_every >= 0,
             f"checkpoint_keep_every={config.checkpoint_keep_every} must not be negative")
    _require(0 <= config.ema_decay < 1, f"ema_decay={config.ema_decay} is not in [0, 1)")
    b = config.benchmark
    _require(b.steps >= 0, f"benchmark.steps={b.steps} must not be negative")
    _require(b.batch_size >= 0, f"benchmark.batch_size={b.batch_size} must not be negative")
    _require(all(n > 0 for n in b.decode_steps),
             f"benchmark.decode_steps={tuple(b.decode_steps)} must all be positive")
    window = tuple(config.get("profile_steps") or ())
    _require(not window or (len(window) == 2 and 0 <= window[0] < window[1]),
             f"profile_steps={window} is not () or (start, end) with 0 <= start < end")
    o = config.optimizer
    for field in ("lr", "end_lr", "warmup_steps", "weight_decay", "clip_norm"):
        _require(o[field] >= 0, f"optimizer.{field}={o[field]} must not be negative")
    for field in ("b1", "b2"):
        _require(0 <= o[field] < 1, f"optimizer.{field}={o[field]} is not in [0, 1)")
    _require(o.eps > 0, f"optimizer.eps={o.eps} must be positive")
    _require(config.data.workers >= 0, f"data.workers={config.data.workers} must not be negative")
    _require(config.data.prefetch >= 0,
             f"data.prefetch={config.data.prefetch} must not be negative")
    _mesh(config, device_count, process_count)
    for i, rule in enumerate(config.sharding.rules):
        _require(isinstance(rule, (tuple, list)) and len(rule) == 2,
                 f"sharding.rules[{i}]={rule!r} is not a (regex, rule) pair")
        try:
            re.compile(rule[0])
        except (re.error, TypeError) as e:
            raise ConfigError(f"sharding.rules[{i}]: {rule[0]!r} is not a regex ({e})") from None
        _require(rule[1] in ("fsdp", "replicate") or isinstance(rule[1], (tuple, list)),
                 f"sharding.rules[{i}]: {rule[1]!r} is not 'fsdp', 'replicate' or a "
                 "PartitionSpec tuple")


def _mesh(config, device_count: int | None, process_count: int) -> None:
    shape = [config.mesh.data, config.mesh.fsdp]
    for name, n in zip(("mesh.data", "mesh.fsdp"), shape):
        _require(n == -1 or n > 0, f"{name}={n} must be positive or -1 (the remaining devices)")
    _require(shape.count(-1) <= 1, "mesh: only one of mesh.data and mesh.fsdp may be -1")
    slices = config.mesh.get("dcn_data", 1)
    _require(slices > 0, f"mesh.dcn_data={slices} must be positive")
    _require(config.batch_size % process_count == 0,
             f"batch_size={config.batch_size} is not divisible by the {process_count} processes")
    if device_count is None:
        return
    known = math.prod(n for n in shape if n != -1)
    _require(device_count % known == 0 and (-1 in shape or known == device_count),
             f"mesh.data x mesh.fsdp = {shape[0]} x {shape[1]} does not fit the "
             f"{device_count} devices")
    for field in ("batch_size", "benchmark.batch_size"):
        value = config[field] if field == "batch_size" else config.benchmark.batch_size
        _require(value % device_count == 0, f"{field}={value} (global) is not divisible by the "
                 f"{device_count} devices")
    data = shape[0] if shape[0] != -1 else device_count // shape[1]
    _require(data % slices == 0,
             f"mesh.data={data} is not divisible by mesh.dcn_data={slices} (slices)")


def _autoencoder(config) -> None:
    m = config.model
    f = 2 ** (len(m.encoder.channel_mult) - 1)
    _require(f == m.spatial_factor,
             f"model.encoder.channel_mult has {len(m.encoder.channel_mult)} levels, a factor of "
             f"{f}, but model.spatial_factor is {m.spatial_factor}")
    _require(config.image_size % f == 0,
             f"image_size={config.image_size} is not divisible by the spatial factor {f}")
    _positive(config, "image_size", "model.latent_channels", "model.norm_groups")
    _one_of(m.decoder, ("diffusion", "conv"), "model.decoder")
    _one_of(m.dtype, DTYPES, "model.dtype")
    if m.decoder == "diffusion":
        mult = tuple(m.unet.channel_mult) or ADM_CHANNEL_MULT.get(config.image_size)
        _require(mult is not None, f"model.unet.channel_mult is empty and ADM has no default for "
                 f"image_size={config.image_size}; set it explicitly")
        _require(config.image_size % 2 ** (len(mult) - 1) == 0,
                 f"image_size={config.image_size} is not divisible by the U-Net's "
                 f"{len(mult) - 1} downsamplings (model.unet.channel_mult)")
        _one_of(m.unet.remat, REMAT, "model.unet.remat")
        _require(m.unet.attention in (None, "xla", "cudnn"),
                 f"model.unet.attention={m.unet.attention!r} is not None, 'xla' or 'cudnn'")
        _diffusion(config)
    w = config.loss
    for field in ("velocity_weight", "kl_weight", "lpips_weight", "l1_weight", "gan_weight"):
        _require(w[field] >= 0, f"loss.{field}={w[field]} must not be negative")
    _one_of(w.lpips_net, lpips.NETS, "loss.lpips_net")
    _require(config.eval.num_images >= 0,
             f"eval.num_images={config.eval.num_images} must not be negative")
    _require(config.eval.step is None or config.eval.step >= 0,
             f"eval.step={config.eval.step} must not be negative")


def _reconstruct(config) -> None:
    r = config.reconstruct
    _require(bool(r.input), "reconstruct.input is required: an image file or a folder of images")
    _require(os.path.exists(r.input), f"reconstruct.input={r.input!r}: no such file or directory")
    _require(bool(r.output), "reconstruct.output is required: the directory to write into")
    _writable(r.output, "reconstruct.output")
    _require(r.step is None or r.step >= 0, f"reconstruct.step={r.step} must not be negative")
    _positive(config, "reconstruct.grid_images")


def _export(config) -> None:
    e = config.export
    _require(bool(e.dir), "export.dir is required: the directory to create")
    _require(not os.path.exists(e.dir), f"export.dir={e.dir!r} already exists; name a new one")
    _writable(e.dir, "export.dir")
    _one_of(e.format, EXPORT_FORMATS, "export.format")
    _require(e.format != "diffusers" or config.model.decoder == "conv",
             "export.format='diffusers' needs model.decoder='conv': AutoencoderKL has no "
             "diffusion decoder")
    _require(e.step is None or e.step >= 0, f"export.step={e.step} must not be negative")
    _positive(config, "export.stat_images")
    if e.format == "diffusers":
        diffusers_io.check_exportable(config, "export.format")


def _distill(config) -> None:
    d = config.distill
    _require(config.model.decoder == "diffusion",
             "task='distill' needs model.decoder='diffusion' (a DGAE teacher)")
    _require(bool(d.teacher), "distill.teacher is required: the teacher run's workdir")
    _require(os.path.isdir(os.path.join(d.teacher, "checkpoints")) or "://" in d.teacher,
             f"distill.teacher={d.teacher!r} is not a trained run's workdir (no checkpoints/)")
    _require(d.teacher_step is None or d.teacher_step >= 0,
             f"distill.teacher_step={d.teacher_step} must not be negative")
    _positive(config, "distill.teacher_steps")
    _one_of(d.teacher_sampler, diffusion.SAMPLERS, "distill.teacher_sampler")
    _one_of(d.teacher_spacing, diffusion.SPACINGS, "distill.teacher_spacing")
    steps = tuple(d.student_steps)
    _require(bool(steps) and all(isinstance(k, int) and k > 0 for k in steps)
             and len(set(steps)) == len(steps),
             f"distill.student_steps={steps!r} must be distinct positive integers, at least one")
    for field in ("mse_weight", "lpips_weight"):
        _require(d[field] >= 0, f"distill.{field}={d[field]} must not be negative")
    _require(d.mse_weight + d.lpips_weight > 0,
             "distill.mse_weight and distill.lpips_weight are both 0: nothing to train on")


def _init(config) -> None:
    """init.*_from: diffusers AutoencoderKL directories whose architecture is this config's."""
    i = config.init
    if i.encoder_from:
        diffusers_io.check_compatible(i.encoder_from, config, ("encoder",), "init.encoder_from")
    if i.decoder_from:
        _require(config.model.decoder == "conv", "init.decoder_from needs model.decoder='conv' "
                 "(the SD-VAE decoder); DGAE's diffusion decoder trains from scratch")
        diffusers_io.check_compatible(i.decoder_from, config, ("decoder",), "init.decoder_from")


def _sweep(config) -> None:
    _require(config.model.decoder == "diffusion",
             f"--mode=sweep needs model.decoder='diffusion', not {config.model.decoder!r}: the "
             "conv decoder (SD-VAE baseline) has no decode steps, sampler or spacing to sweep")
    e = config.eval
    steps = tuple(e.sweep_steps)
    _require(bool(steps) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                 for n in steps) and len(set(steps)) == len(steps),
             f"eval.sweep_steps={steps!r} must be distinct positive integers, at least one")
    if config.task == "distill":
        teacher = tuple(e.sweep_teacher_steps)
        _require(all(isinstance(n, int) and n > 0 for n in teacher)
                 and len(set(teacher)) == len(teacher),
                 f"eval.sweep_teacher_steps={teacher!r} must be distinct positive integers")
    for field, allowed in (("sweep_samplers", diffusion.SAMPLERS),
                           ("sweep_spacings", diffusion.SPACINGS)):
        values = tuple(e[field])
        _require(bool(values) and set(values) <= set(allowed) and len(set(values)) == len(values),
                 f"eval.{field}={values!r} must be distinct names from {allowed}, at least one")


def _diffusion(config) -> None:
    d = config.diffusion
    _one_of(d.time_sampling, diffusion.TIME_SAMPLINGS, "diffusion.time_sampling")
    _one_of(d.sampler, diffusion.SAMPLERS, "diffusion.sampler")
    _one_of(d.spacing, diffusion.SPACINGS, "diffusion.spacing")
    _positive(config, "diffusion.sample_steps")
    _require(d.time_scale > 0, f"diffusion.time_scale={d.time_scale} must be positive")


def _ldm_diffusion(config) -> None:
    d = config.diffusion
    _one_of(d.objective, OBJECTIVES, "diffusion.objective")
    if d.objective == "rf":
        _diffusion(config)
        return
    _one_of(d.sampler, ddpm.SAMPLERS, "diffusion.sampler")
    _one_of(d.spacing, ddpm.SPACINGS, "diffusion.spacing")
    _require(d.num_timesteps >= 2, f"diffusion.num_timesteps={d.num_timesteps} must be >= 2")
    scale = 1000 / d.num_timesteps
    _require(0 < d.beta_start < d.beta_end and d.beta_end * scale < 1,
             f"diffusion.beta_start={d.beta_start}, beta_end={d.beta_end} must satisfy 0 < start "
             f"< end < {d.num_timesteps / 1000} (num_timesteps / 1000)")
    _require(2 <= d.sample_steps <= d.num_timesteps,
             f"diffusion.sample_steps={d.sample_steps} is not in [2, diffusion.num_timesteps="
             f"{d.num_timesteps}]")


def _writable(path: str, name: str) -> None:
    """A local directory that exists and is writable, or can be created (its nearest existing
    ancestor is a writable directory). Bucket URLs are left to the first write."""
    if "://" in path:
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    _require(os.path.isdir(existing), f"{name}={path!r} cannot be created: {existing!r} is not "
             "a directory")
    _require(os.access(existing, os.W_OK | os.X_OK),
             f"{name}={path!r} is not writable ({existing!r} denies this user)")


def _data(config) -> None:
    d = config.data
    name = d.name
    _require(name in ("embedded", "folder") or (isinstance(name, str) and name.startswith("tfds:")
                                                and len(name) > len("tfds:")),
             f"unknown data.name={name!r}; expected 'embedded', 'folder' or "
             "'tfds:<tfds dataset name>' (e.g. 'tfds:imagenet2012')")
    if name == "folder":
        _require(bool(d.dir), "data.name='folder' needs data.dir (the folder holding the splits)")
        _require(os.path.isdir(d.dir) or "://" in d.dir,
                 f"data.dir={d.dir!r} does not exist or is not a directory")
    _one_of(d.crop, pipeline.CROPS, "data.crop")
    _one_of(d.bad_images, bad_images.POLICIES, "data.bad_images")
    _require(0 <= d.max_bad_fraction <= 1,
             f"data.max_bad_fraction={d.max_bad_fraction} is not in [0, 1]")
    _require(0 < d.min_scale <= 1, f"data.min_scale={d.min_scale} is not in (0, 1]")
    _require(d.eval_size >= 0, f"data.eval_size={d.eval_size} must not be negative")
    _require(d.get("eval_crops", 8) >= 1, f"data.eval_crops={d.get('eval_crops')} must be >= 1")
    if d.eval_subset:
        path = sources.NAMED_SUBSETS.get(d.eval_subset, d.eval_subset)
        _require(os.path.isfile(path), f"data.eval_subset={d.eval_subset!r} is neither one of "
                 f"{sorted(sources.NAMED_SUBSETS)} nor a file of file names")


def _cache_job(config, device_count: int | None) -> None:
    c = config.cache
    _require(bool(c.dir) or c.benchmark > 0, "cache.dir is required for --mode=cache_latents")
    _one_of(c.dtype, CACHE_DTYPES, "cache.dtype")
    splits = tuple(c.splits)
    _require(bool(splits) and len(set(splits)) == len(splits) and set(splits) <= set(CACHE_ROLES),
             f"cache.splits={splits!r} must be distinct names from {CACHE_ROLES}")
    _positive(config, "cache.batch_size", "cache.examples_per_shard", "cache.crops_per_image")
    _require(c.read_threads >= 0, f"cache.read_threads={c.read_threads} must not be negative")
    _require(c.benchmark >= 0, f"cache.benchmark={c.benchmark} must not be negative")
    _require(c.step is None or c.step >= 0, f"cache.step={c.step} must not be negative")
    if device_count is not None:
        _require(c.batch_size % device_count == 0,
                 f"cache.batch_size={c.batch_size} (global) is not divisible by the "
                 f"{device_count} devices")


def _ldm(config, mode: str) -> None:
    m = config.model
    _positive(config, "model.hidden", "model.heads", "model.depth", "model.patch_size",
              "model.latent_size", "model.latent_channels", "model.num_classes")
    _require(m.hidden % m.heads == 0 and (m.hidden // m.heads) % 2 == 0,
             f"model.hidden={m.hidden} does not split into model.heads={m.heads} heads of even "
             "width")
    _require(m.latent_size % m.patch_size == 0,
             f"model.patch_size={m.patch_size} does not divide model.latent_size={m.latent_size}")
    _require(0 <= m.label_dropout < 1, f"model.label_dropout={m.label_dropout} is not in [0, 1)")
    _one_of(m.dtype, DTYPES, "model.dtype")
    _ldm_diffusion(config)
    _require(config.diffusion.guidance >= 0,
             f"diffusion.guidance={config.diffusion.guidance} must not be negative")
    _one_of(config.cache.latent, LATENT_MODES, "cache.latent")
    if mode in WORKDIR_MODES:
        _require(bool(config.cache.dir), "cache.dir is required: the latent cache written by "
                 "--mode=cache_latents")
        _require(os.path.isdir(config.cache.dir) or "://" in config.cache.dir,
                 f"cache.dir={config.cache.dir!r} does not exist")
    s, e = config.sample, config.eval
    bad = [c for c in s.classes if not 0 <= c < m.num_classes]
    _require(not bad, f"sample.classes={bad} are outside [0, {m.num_classes}) "
             f"(model.num_classes={m.num_classes})")
    _positive(config, "sample.num")
    if s.decoder:
        _require(os.path.isdir(os.path.join(s.decoder, "checkpoints")) or "://" in s.decoder,
                 f"sample.decoder={s.decoder!r} is not a trained run's workdir (no checkpoints/)")
    for field in ("num_images", "fid_samples"):
        _require(e[field] >= 0, f"eval.{field}={e[field]} must not be negative")
    for field, step in (("sample.step", s.step), ("eval.step", e.step)):
        _require(step is None or step >= 0, f"{field}={step} must not be negative")
    if e.fid_reference and mode in ("train", "eval"):
        _file(e.fid_reference, "eval.fid_reference")
    if e.inception_weights and e.fid_samples and mode in ("train", "eval"):
        _file(e.inception_weights, "eval.inception_weights")
