"""The checks a config field is judged by, each raising ConfigError with one line that names the
field. validation.py, the tasks and the modes build their start-up checks from these."""

from __future__ import annotations

import os

from dgae_jax import diffusion
from dgae_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def field(config, name: str):
    """The value of a dotted field: field(config, 'model.unet.width')."""
    value = config
    for part in name.split("."):
        value = value[part]
    return value


def positive(config, *names: str) -> None:
    for name in names:
        value = field(config, name)
        require(value > 0, f"{name}={value} must be positive")


def not_negative(config, *names: str) -> None:
    for name in names:
        value = field(config, name)
        require(value >= 0, f"{name}={value} must not be negative")


def optional_step(config, *names: str) -> None:
    """Checkpoint steps that may be None (the newest) but not negative."""
    for name in names:
        value = field(config, name)
        require(value is None or value >= 0, f"{name}={value} must not be negative")


def one_of(value, allowed, name: str) -> None:
    require(value in allowed, f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")


def distinct_positive_ints(value, name: str, *, at_least_one: bool = True) -> None:
    values = tuple(value)
    ok = (all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in values)
          and len(set(values)) == len(values) and (values or not at_least_one))
    require(bool(ok), f"{name}={values!r} must be distinct positive integers"
            + (", at least one" if at_least_one else ""))


def file(path: str, name: str) -> None:
    require(os.path.isfile(path) or "://" in path, f"{name}={path!r}: no such file")


def run_workdir(path: str, name: str) -> None:
    """A trained run's workdir (it has checkpoints/); bucket URLs are left to the first read."""
    require(os.path.isdir(os.path.join(path, "checkpoints")) or "://" in path,
            f"{name}={path!r} is not a trained run's workdir (no checkpoints/)")


def writable(path: str, name: str) -> None:
    """A local directory that exists and is writable, or can be created (its nearest existing
    ancestor is a writable directory). Bucket URLs are left to the first write."""
    if "://" in path:
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    require(os.path.isdir(existing), f"{name}={path!r} cannot be created: {existing!r} is not "
            "a directory")
    require(os.access(existing, os.W_OK | os.X_OK),
            f"{name}={path!r} is not writable ({existing!r} denies this user)")


def rectified_flow(config) -> None:
    """The `diffusion` fields of a rectified flow (the DGAE decoder, the DiT's rf objective)."""
    d = config.diffusion
    one_of(d.time_sampling, diffusion.TIME_SAMPLINGS, "diffusion.time_sampling")
    one_of(d.sampler, diffusion.SAMPLERS, "diffusion.sampler")
    one_of(d.spacing, diffusion.SPACINGS, "diffusion.spacing")
    positive(config, "diffusion.sample_steps", "diffusion.time_scale")
