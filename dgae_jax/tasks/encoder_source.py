"""Where a pretrained encoder comes from (`init.encoder_from`): a diffusers `AutoencoderKL`
directory (SD-VAE's public weights), one of our autoencoder runs (its newest intact EMA
checkpoint), or a bundle written by `--mode=export`.

A decoder trained on a frozen encoder (`init.freeze_encoder`, configs/sd_decoder.py) decodes
exactly the latents that encoder gives, so latent datasets and diffusion models built on it keep
working. The source's architecture is checked against the config at start-up, in one line, and
its latent scaling factor (diffusers' `scaling_factor`, or the source run's
`model.scaling_factor`) is carried into the new run's config.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections

from dgae_jax import bundle, diffusers_io, parallel, runs
from dgae_jax.autoencoder import Autoencoder
from dgae_jax.errors import ConfigError

FIELD = "init.encoder_from"


def kind(path: str) -> str:
    """'run', 'bundle' or 'diffusers' (anything else: checked as a diffusers directory)."""
    if runs.is_run(path):
        return "run"
    return "bundle" if bundle.is_bundle(path) else "diffusers"


def _saved_config(path: str) -> ml_collections.ConfigDict:
    """The config of a run (its newest intact checkpoint's) or of a bundle."""
    if kind(path) == "run":
        config = runs.saved_config(path)[1]
        if config.get("task") != "autoencoder":
            raise ConfigError(f"{FIELD}={path!r} is a {config.get('task')!r} run; name the "
                              "autoencoder run its encoder comes from")
        return config
    try:
        return ml_collections.ConfigDict(json.loads((Path(path) / bundle.CONFIG).read_text()))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{FIELD}={path!r}: {bundle.CONFIG} cannot be read ({error})") from None


def _encoder_shapes(config: ml_collections.ConfigDict) -> dict:
    model = Autoencoder.from_config(config, with_lpips=False)
    shapes = jax.eval_shape(model.init, jax.random.key(0))["encoder"]
    return {parallel.path_name(p): a.shape
            for p, a in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def check_path(path: str, config: ml_collections.ConfigDict) -> None:
    """The start-up check, without JAX or file reads beyond JSON: a diffusers directory is
    checked against the config in full (its config.json); a run or a bundle must exist, and its
    architecture is checked by `check` once the runtime is up."""
    if kind(path) != "diffusers":
        return
    if Path(path).is_dir() and not (Path(path) / diffusers_io.WEIGHTS_FILE).is_file():
        raise ConfigError(f"{FIELD}={path!r} is neither a run's workdir (checkpoints/), a bundle "
                          f"({bundle.WEIGHTS} + {bundle.CONFIG}) nor a diffusers AutoencoderKL "
                          f"directory ({diffusers_io.CONFIG_FILE} + {diffusers_io.WEIGHTS_FILE})")
    diffusers_io.check_compatible(path, config, ("encoder",), FIELD)


def check(path: str, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError (one line) unless `path` holds an encoder of `config`'s architecture:
    the same parameter shapes, spatial factor and normalisation groups. A run's config is read
    through Orbax, so in a multi-process job this runs after the distributed runtime is up."""
    check_path(path, config)
    if kind(path) == "diffusers":
        return
    theirs = _saved_config(path)
    for name in ("spatial_factor", "latent_channels", "norm_groups"):
        if theirs.model[name] != config.model[name]:
            raise ConfigError(f"{FIELD}={path!r} has model.{name}={theirs.model[name]}, this "
                              f"config {config.model[name]}")
    ours, source = _encoder_shapes(config), _encoder_shapes(theirs)
    if ours != source:
        name = sorted(set(ours) ^ set(source)) or [k for k in ours if ours[k] != source[k]]
        raise ConfigError(f"{FIELD}={path!r}: its encoder is not this config's model.encoder "
                          f"(first difference: {name[0]})")


def scaling_factor(path: str) -> float | None:
    """The latent scaling factor the source declares: diffusers' config.json `scaling_factor`
    (0.18215 for SD 1.x/2.x's VAE), or a run's or bundle's model.scaling_factor; None if none."""
    if kind(path) != "diffusers":
        return _saved_config(path).model.get("scaling_factor")
    try:
        value = json.loads((Path(path) / diffusers_io.CONFIG_FILE).read_text()).get(
            "scaling_factor")
    except (OSError, ValueError, AttributeError):
        return None  # the start-up check names what is wrong with the directory
    return None if value is None else float(value)


def load(path: str, config: ml_collections.ConfigDict) -> dict:
    """The encoder's float32 parameters as host numpy arrays on every process, in exactly the
    tree of `Autoencoder.init(...)['encoder']` for `config`."""
    check(path, config)
    what = kind(path)
    if what == "diffusers":
        return diffusers_io.load_params(path, config, ("encoder",), field=FIELD)["encoder"]
    if what == "bundle":
        return bundle.read(path)[1]["encoder"]
    theirs = _saved_config(path)
    model = Autoencoder.from_config(theirs, with_lpips=False)
    _, ema = runs.restore_ema(theirs, path, Autoencoder.init, model,
                              parallel.make_mesh(config.mesh), field=FIELD)
    return runs.to_host(ema["encoder"])
