"""The exported inference bundle: what `--mode=export` writes and `api.load` reads.

    config.json        the run's config (ml_collections JSON): rebuilds the model exactly
    model.safetensors  the EMA encoder and decoder, float32, keys such as
                       'encoder/levels/0/blocks/0/conv1/kernel' (header metadata: format, step)
    model_card.json    step, evaluation figures, latent shape and statistics (modes/export.py)
    README.md          the same card for people

No optimiser state, discriminator or LPIPS weights: only what encoding and decoding need, in
the safetensors format (no pickle), readable without JAX. A bundle is written into a temporary
directory and renamed into place, so a directory named like a bundle is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import safetensors
from safetensors import numpy as safetensors_numpy

from dgae_jax import parallel
from dgae_jax.autoencoder import Autoencoder
from dgae_jax.errors import ConfigError

FORMAT = "dgae-bundle/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "model_card.json"
MODULES = ("encoder", "decoder")


def is_bundle(path: str | os.PathLike) -> bool:
    return (Path(path) / WEIGHTS).is_file() and (Path(path) / CONFIG).is_file()


def flatten(params: dict) -> dict[str, np.ndarray]:
    """{'encoder': ..., 'decoder': ...} -> {'encoder/conv_in/kernel': float32 array, ...}."""
    leaves = jax.tree_util.tree_flatten_with_path({m: params[m] for m in MODULES})[0]
    return {parallel.path_name(path): np.ascontiguousarray(np.asarray(leaf, np.float32))
            for path, leaf in leaves}


def unflatten(arrays: dict[str, np.ndarray], config: ml_collections.ConfigDict,
              source: str) -> dict:
    """The inverse of `flatten` into the exact tree `Autoencoder.init` gives for `config`;
    a missing, unexpected or misshapen array is an error naming it and `source`."""
    model = Autoencoder.from_config(config, with_lpips=False)
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    abstract = {m: abstract[m] for m in MODULES}
    expected = {parallel.path_name(p): a for p, a in
                jax.tree_util.tree_flatten_with_path(abstract)[0]}
    extra = sorted(set(arrays) - set(expected))
    if extra:
        raise ConfigError(f"{source}: unexpected array {extra[0]!r} for this config "
                          f"({len(extra)} in all)")

    def leaf(path, a):
        name = parallel.path_name(path)
        if name not in arrays:
            raise ConfigError(f"{source}: missing array {name!r}")
        if tuple(arrays[name].shape) != tuple(a.shape):
            raise ConfigError(f"{source}: {name!r} has shape {tuple(arrays[name].shape)}, the "
                              f"config needs {tuple(a.shape)}")
        return np.asarray(arrays[name], np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def write(directory: str | os.PathLike, config: ml_collections.ConfigDict, params: dict,
          step: int, card: dict, readme: str) -> Path:
    """Writes the bundle of `params` (host or device arrays) to `directory` (which must not
    exist yet), atomically."""
    directory = Path(directory).absolute()
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        (tmp / CONFIG).write_text(config.to_json_best_effort(indent=1))
        safetensors_numpy.save_file(flatten(jax.device_get(params)), tmp / WEIGHTS,
                                    metadata={"format": FORMAT, "step": str(step)})
        (tmp / CARD).write_text(json.dumps({"format": FORMAT, "step": step, **card}, indent=1))
        (tmp / "README.md").write_text(readme)
        (tmp / WEIGHTS).chmod(0o644)  # safetensors creates it private; a bundle is for sharing
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read(directory: str | os.PathLike) -> tuple[ml_collections.ConfigDict, dict, int]:
    """(config, host float32 parameters, step) of a bundle."""
    directory = Path(directory)
    try:
        config = ml_collections.ConfigDict(json.loads((directory / CONFIG).read_text()))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{directory / CONFIG}: cannot be read ({error})") from error
    weights = directory / WEIGHTS
    try:
        with safetensors.safe_open(weights, framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:  # safetensors raises its own error types
        raise ConfigError(f"{weights}: cannot be read ({type(error).__name__}: {error})"
                          ) from error
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{weights}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return config, unflatten(arrays, config, str(weights)), int(meta["step"])
