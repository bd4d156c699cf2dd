"""Reads and writes diffusers `AutoencoderKL` directories (config.json +
diffusion_pytorch_model.safetensors).

SD-VAE's public weights are published in this format (huggingface diffusers), so our SD-VAE
encoder and the conv baseline's decoder can start from them; and an exported conv baseline loads
with `diffusers.AutoencoderKL.from_pretrained`. Tensor names follow diffusers'
`models/autoencoders/vae.py`. Layouts differ: torch convs are OIHW and ours HWIO, torch Linear
weights (out, in) and ours (in, out), and our attention fuses diffusers' to_q/to_k/to_v into one
`qkv` Linear whose columns are [q | k | v]. One mapping, from our parameter path to diffusers'
names, serves both directions, so save-then-load returns the same bits.

Only safetensors and json are used here; torch and diffusers are test-only dependencies.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from dgae_jax.autoencoder import Autoencoder
from dgae_jax.errors import ConfigError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

# Our config section of each module, and diffusers' block-type key, plain and attention types.
_SECTION = {"encoder": "encoder", "decoder": "conv_decoder"}
_BLOCKS = {"encoder": ("down_block_types", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
           "decoder": ("up_block_types", "UpDecoderBlock2D", "AttnUpDecoderBlock2D")}
# AutoencoderKL.__init__'s defaults, which diffusers assumes for keys a config.json leaves out
# (SD-VAE's own files predate use_quant_conv and mid_block_add_attention).
_DEFAULTS = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                 up_block_types=["UpDecoderBlock2D"], block_out_channels=[64], layers_per_block=1,
                 act_fn="silu", latent_channels=4, norm_num_groups=32, use_quant_conv=True,
                 use_post_quant_conv=True, mid_block_add_attention=True)
# Our module names -> diffusers' ('levels' depends on the module; 'qkv' becomes three tensors).
_RENAME = {"blocks": "resnets", "attns": "attentions", "down": "downsamplers.0",
           "up": "upsamplers.0", "skip": "conv_shortcut", "mid_block1": "mid_block.resnets.0",
           "mid_attn": "mid_block.attentions.0", "mid_block2": "mid_block.resnets.1",
           "norm_out": "conv_norm_out", "norm": "group_norm", "proj": "to_out.0",
           "kernel": "weight", "scale": "weight"}
# The names of diffusers' former AttentionBlock, still in published SD-VAE files (Stable Diffusion
# 2.1's among them); diffusers renames them on load (ModelMixin._fix_state_dict_keys_on_load), and
# so do we.
_LEGACY = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

Keys = tuple[str, ...]


# ----------------------------------------------------------------------------- config
def _attention_levels(config: ml_collections.ConfigDict, module: str) -> list[bool]:
    """Per level (0 = full resolution), whether its blocks have attention; the feature size of
    each level is computed as Encoder / ConvDecoder compute it."""
    s = config.model[_SECTION[module]]
    n = len(s.channel_mult)
    if module == "encoder":
        sizes = [config.image_size // 2**i for i in range(n)]
    else:
        sizes = [config.image_size // 2 ** (n - 1) * 2 ** (n - 1 - i) for i in range(n)]
    return [size in s.attn_resolutions for size in sizes]


def _block_types(config: ml_collections.ConfigDict, module: str) -> list[str]:
    """diffusers' down_block_types (level order) or up_block_types (deepest level first)."""
    _, plain, attn = _BLOCKS[module]
    types = [attn if a else plain for a in _attention_levels(config, module)]
    return types if module == "encoder" else types[::-1]


def _block_out_channels(config: ml_collections.ConfigDict, module: str) -> list[int]:
    s = config.model[_SECTION[module]]
    return [s.width * m for m in s.channel_mult]


def _requirements(config: ml_collections.ConfigDict, modules) -> list[tuple[str, Any, str]]:
    """(diffusers config key, the value our model needs, where our value comes from)."""
    m = config.model
    reqs = [("latent_channels", m.latent_channels, "model.latent_channels"),
            ("norm_num_groups", m.norm_groups, "model.norm_groups"),
            ("act_fn", "silu", "our SiLU"),
            ("mid_block_add_attention", True, "our mid-block attention")]
    for module in modules:
        s, f = m[_SECTION[module]], f"model.{_SECTION[module]}"
        enc = module == "encoder"
        reqs += [
            ("in_channels" if enc else "out_channels", 3, f"our {module}'s RGB images"),
            ("block_out_channels", _block_out_channels(config, module), f"{f}.width*channel_mult"),
            ("layers_per_block", s.num_res_blocks, f"{f}.num_res_blocks"),
            (_BLOCKS[module][0], _block_types(config, module),
             f"{f}.attn_resolutions={tuple(s.attn_resolutions)} at image_size={config.image_size}"),
            ("use_quant_conv" if enc else "use_post_quant_conv", True,
             f"our {module}'s {'quant_conv' if enc else 'post_quant_conv'}")]
    return reqs


def _mismatches(path: Path, config: ml_collections.ConfigDict, modules) -> list[str]:
    if not path.is_dir():
        return ["no such directory"]
    if not (path / WEIGHTS_FILE).is_file():
        return [f"no {WEIGHTS_FILE}"]
    try:
        theirs = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        return [f"no {CONFIG_FILE}"]
    except (OSError, ValueError) as e:
        return [f"{CONFIG_FILE} is unreadable ({e})"]
    kind = theirs.get("_class_name", "AutoencoderKL") if isinstance(theirs, dict) else None
    if kind != "AutoencoderKL":
        return [f"{CONFIG_FILE} is not an AutoencoderKL's (_class_name={kind!r})"]
    out = []
    if "decoder" in modules and config.model.decoder != "conv":
        out.append(f"model.decoder={config.model.decoder!r} has no conv decoder to load")
    for key, want, source in _requirements(config, modules):
        got = theirs.get(key, _DEFAULTS[key])
        got = list(got) if isinstance(got, (list, tuple)) else got
        if got != want:
            out.append(f"{key}={got!r} but {source} needs {want!r}")
    return out


def check_compatible(path, config: ml_collections.ConfigDict, modules, field: str) -> None:
    """Raises ConfigError (one line naming `field`, the path and every mismatch) unless `path`
    is an AutoencoderKL directory whose `modules` ('encoder', 'decoder' = our ConvDecoder) have
    our config's architecture. Reads config.json only, so it is cheap enough for start-up."""
    unknown = set(modules) - set(_SECTION)
    if unknown:
        raise ValueError(f"unknown modules {sorted(unknown)}; known: {', '.join(_SECTION)}")
    problems = _mismatches(Path(path), config, modules)
    if problems:
        raise ConfigError(f"{field}: {path}: {'; '.join(problems)}")


# ----------------------------------------------------------------------------- tensors
def _abstract(config: ml_collections.ConfigDict) -> dict:
    """Our parameter shapes: `jax.eval_shape` of Autoencoder.init (nothing is allocated)."""
    return _abstract_frozen(ml_collections.FrozenConfigDict(config))


@functools.lru_cache(maxsize=4)
def _abstract_frozen(config: ml_collections.FrozenConfigDict) -> dict:
    # Tracing the modules takes about a second; a start-up check and the load share it.
    return jax.eval_shape(Autoencoder.from_config(config, with_lpips=False).init,
                          jax.random.key(0))


def _keys(path) -> Keys:
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flat(tree) -> dict[Keys, Any]:
    return {_keys(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _torch_names(module: str, keys: Keys) -> list[str]:
    """diffusers' tensor name(s) of our parameter `keys` (three for a fused qkv)."""
    levels = "down_blocks" if module == "encoder" else "up_blocks"
    parts = [levels if k == "levels" else _RENAME.get(k, k) for k in keys]
    prefix = "" if keys[0] in ("quant_conv", "post_quant_conv") else f"{module}."
    if keys[-2] == "qkv":
        return [prefix + ".".join(parts[:-2] + [p, parts[-1]]) for p in ("to_q", "to_k", "to_v")]
    return [prefix + ".".join(parts)]


def _to_ours(tensors: list[np.ndarray]) -> np.ndarray:
    """OIHW conv -> HWIO, (out, in) Linear -> (in, out); q, k, v side by side."""
    ts = [np.asarray(t, np.float32) for t in tensors]
    ts = [t.transpose(2, 3, 1, 0) if t.ndim == 4 else t.T if t.ndim == 2 else t for t in ts]
    return np.ascontiguousarray(np.concatenate(ts, axis=-1))


def _to_torch(x, n: int) -> list[np.ndarray]:
    """The inverse of `_to_ours` for a parameter that diffusers keeps as `n` tensors."""
    parts = np.split(np.asarray(x, np.float32), n, axis=-1)
    return [np.ascontiguousarray(p.transpose(3, 2, 0, 1) if p.ndim == 4 else p.T if p.ndim == 2
                                 else p) for p in parts]


def _owner(name: str) -> str | None:
    if name.startswith(("encoder.", "quant_conv.")):
        return "encoder"
    if name.startswith(("decoder.", "post_quant_conv.")):
        return "decoder"
    return None


def load_params(path, config: ml_collections.ConfigDict, modules, *,
                field: str = "diffusers AutoencoderKL") -> dict[str, dict]:
    """{module: pure dict of float32 numpy arrays} for `modules` ('encoder', 'decoder'), in
    exactly the tree, keys and shapes of `Autoencoder.init(...)[module]`.

    The walk follows `jax.eval_shape` of our init, so the tree is ours by construction; each
    key's tensor(s) must exist with the shape that key needs, and every tensor of the loaded
    modules must be used, else a one-line ConfigError names `field`, the path and the key.
    """
    check_compatible(path, config, modules, field)
    file = Path(path) / WEIGHTS_FILE
    try:
        stored = load_file(str(file))
    except (OSError, ValueError, SafetensorError) as e:
        raise ConfigError(f"{field}: cannot read {file}: {e}") from None
    tensors = {_LEGACY.sub(lambda m: m[1] + _LEGACY_NAMES[m[2]] + ".", k): v
               for k, v in stored.items()}
    if len(tensors) != len(stored):
        raise ConfigError(f"{field}: {file} has attention tensors under both their old "
                          f"(query/key/value/proj_attn) and their current names")
    expected, out, used = _abstract(config), {}, set()
    for module in modules:
        flat = {}
        for keys, leaf in _flat(expected[module]).items():
            names = _torch_names(module, keys)
            where = f"{field}: {path}: {module}/{'/'.join(keys)}"
            missing = [n for n in names if n not in tensors]
            if missing:
                raise ConfigError(f"{where}: no tensor {missing[0]}")
            flat[keys] = _to_ours([tensors[n] for n in names])
            if flat[keys].shape != leaf.shape:
                raise ConfigError(f"{where}: {names[0]} gives shape {flat[keys].shape}, "
                                  f"our model needs {leaf.shape}")
            used.update(names)
        out[module] = jax.tree_util.tree_map_with_path(lambda p, _: flat[_keys(p)],
                                                       expected[module])
    left = sorted(n for n in tensors if n not in used and _owner(n) in (*modules, None))
    if left:
        raise ConfigError(f"{field}: {path}: {len(left)} tensors our model has no place for: "
                          f"{', '.join(left[:3])}{', ...' if len(left) > 3 else ''}")
    return out


# ----------------------------------------------------------------------------- export
def _export_config(config: ml_collections.ConfigDict, scaling_factor: float) -> dict:
    """The config.json of our conv autoencoder; AutoencoderKL shares block_out_channels and
    layers_per_block between its encoder and decoder, so ours must agree on them."""
    enc, dec = config.model.encoder, config.model.conv_decoder
    for ours, theirs, what in (
            (_block_out_channels(config, "encoder"), _block_out_channels(config, "decoder"),
             "width*channel_mult"), (enc.num_res_blocks, dec.num_res_blocks, "num_res_blocks")):
        if ours != theirs:
            raise ConfigError(f"model.conv_decoder {what}={theirs} differs from model.encoder "
                              f"{what}={ours}; a diffusers AutoencoderKL shares one value")
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "down_block_types": _block_types(config, "encoder"),
            "up_block_types": _block_types(config, "decoder"),
            "block_out_channels": _block_out_channels(config, "encoder"),
            "layers_per_block": enc.num_res_blocks, "act_fn": "silu",
            "latent_channels": config.model.latent_channels,
            "norm_num_groups": config.model.norm_groups, "sample_size": config.image_size,
            "scaling_factor": scaling_factor, "force_upcast": True, "use_quant_conv": True,
            "use_post_quant_conv": True, "mid_block_add_attention": True}


def check_exportable(config: ml_collections.ConfigDict, field: str) -> None:
    """Whether the conv autoencoder of `config` has an AutoencoderKL form (a start-up check: no
    weights involved); the ConfigError names `field`."""
    try:
        _export_config(config, 1.0)
    except ConfigError as error:
        raise ConfigError(f"{field}='diffusers': {error}") from None


def _write(path: Path, files_config: dict, tensors: dict[str, np.ndarray],
           extra_files: dict[str, str]) -> None:
    """Writes into a hidden sibling directory and renames it into place, so `path` either does
    not exist or is complete (`extra_files`, name -> text, included)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} already exists; export into a new or empty directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(files_config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide the export from other users
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(path, config: ml_collections.ConfigDict, params: dict, scaling_factor: float,
         extra_files: dict[str, str] | None = None) -> Path:
    """Exports our conv autoencoder's {'encoder', 'decoder'} params (other entries, such as a
    discriminator, are left out) as a diffusers AutoencoderKL directory at `path`, with
    `extra_files` (name -> text, such as a model card) beside them; returns the directory.

    `scaling_factor` goes into config.json: latent diffusion pipelines multiply latents by it
    (SD-VAE's 0.18215 gives its latents about unit variance). The params must have our config's
    tree and shapes; the first key that does not is named in a one-line ConfigError.
    """
    if config.model.decoder != "conv":
        raise ConfigError(f"model.decoder={config.model.decoder!r}: only the conv baseline has "
                          f"a diffusers AutoencoderKL form")
    scaling_factor = float(scaling_factor)
    if not (np.isfinite(scaling_factor) and scaling_factor > 0):
        raise ConfigError(f"scaling_factor={scaling_factor} must be positive and finite")
    files_config = _export_config(config, scaling_factor)
    expected, tensors = _abstract(config), {}
    for module in _SECTION:
        if module not in params:
            raise ConfigError(f"params have no {module!r}")
        got, want = _flat(params[module]), _flat(expected[module])
        for keys, leaf in want.items():
            where = f"params['{module}']: {'/'.join(keys)}"
            if keys not in got:
                raise ConfigError(f"{where} is missing")
            if np.shape(got[keys]) != leaf.shape:
                raise ConfigError(f"{where} has shape {np.shape(got[keys])}, config needs "
                                  f"{leaf.shape}")
            names = _torch_names(module, keys)
            tensors.update(zip(names, _to_torch(got[keys], len(names))))
        extra = [k for k in got if k not in want]
        if extra:
            raise ConfigError(f"params['{module}']: {'/'.join(extra[0])} is not in the config's "
                              f"model")
    path = Path(path).absolute()
    _write(path, files_config, tensors, extra_files or {})
    return path
