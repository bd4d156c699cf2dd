"""Building blocks shared by the SD-VAE encoder/decoder and the ADM U-Net.

All modules are NHWC, keep float32 parameters and compute in `dtype` (bfloat16 for the paper
configs). Normalisation statistics are always reduced in float32 by Flax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

zeros_init = nnx.initializers.zeros_init()


def group_norm(channels: int, groups: int, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    if channels % groups:
        raise ValueError(f"norm_groups={groups} does not divide a layer width of {channels}")
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-6, dtype=dtype, rngs=rngs)


def conv(cin: int, cout: int, kernel: int, dtype, rngs: nnx.Rngs, *, stride: int = 1,
         zero: bool = False) -> nnx.Conv:
    """A conv with 'same'-style symmetric padding; `zero` gives ADM's zero-initialised outputs."""
    extra = {"kernel_init": zeros_init} if zero else {}
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=kernel // 2,
                    dtype=dtype, rngs=rngs, **extra)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """ADM's sinusoidal embedding of (possibly fractional) timesteps: [cos | sin], shape (B, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-conv twice with a residual path.

    With `emb_dim` it is ADM's block: the timestep embedding modulates the second norm
    (scale-shift norm) and the last conv starts at zero. Without it, it is SD-VAE's ResnetBlock.
    """

    def __init__(self, cin: int, cout: int, *, groups: int, dtype, rngs: nnx.Rngs,
                 emb_dim: int | None = None):
        self.norm1 = group_norm(cin, groups, dtype, rngs)
        self.conv1 = conv(cin, cout, 3, dtype, rngs)
        self.emb_proj = (nnx.Linear(emb_dim, 2 * cout, dtype=dtype, rngs=rngs)
                         if emb_dim else None)
        self.norm2 = group_norm(cout, groups, dtype, rngs)
        self.conv2 = conv(cout, cout, 3, dtype, rngs, zero=emb_dim is not None)
        self.skip = conv(cin, cout, 1, dtype, rngs) if cin != cout else None

    def __call__(self, x: jax.Array, emb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb_proj is not None:
            scale, shift = jnp.split(self.emb_proj(nnx.silu(emb))[:, None, None, :], 2, axis=-1)
            h = h * (1 + scale) + shift
        h = self.conv2(nnx.silu(h))
        return h + (self.skip(x) if self.skip is not None else x)


class Attention(nnx.Module):
    """Spatial self-attention over all H*W positions (ADM's AttentionBlock, SD-VAE's AttnBlock).

    `head_channels=None` is one head over all channels (SD-VAE); ADM uses 64 channels per head.
    Runs through `jax.nn.dot_product_attention` so fused kernels are used where available.
    """

    def __init__(self, channels: int, *, groups: int, dtype, rngs: nnx.Rngs,
                 head_channels: int | None = None, zero_out: bool = False,
                 implementation: str | None = None):
        head_channels = head_channels or channels
        self.implementation = implementation  # None: JAX's choice; 'xla' | 'cudnn' to force
        if channels % head_channels:
            raise ValueError(f"head_channels={head_channels} does not divide {channels} channels")
        self.heads = channels // head_channels
        self.norm = group_norm(channels, groups, dtype, rngs)
        self.qkv = nnx.Linear(channels, 3 * channels, dtype=dtype, rngs=rngs)
        extra = {"kernel_init": zeros_init} if zero_out else {}
        self.proj = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs, **extra)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, h * w, 3, self.heads, c // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if qkv.dtype == jnp.float16 and self.implementation != "cudnn":
            # float16 scores and softmax sums overflow on large inputs (diffusers upcasts its
            # attention softmax for the same reason), and XLA:CPU has no float16 matmul into
            # float32: attend in float32. cuDNN's fused kernel accumulates in float32 itself.
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        out = out.astype(qkv.dtype).reshape(b, h, w, c)
        return x + self.proj(out)


def blocks_with_attention(blocks, attns, h: jax.Array) -> jax.Array:
    """A level of the SD-VAE encoder/decoder: each ResBlock followed by its attention, if any."""
    for block, attn in zip(blocks, attns):
        h = block(h)
        if attn is not None:
            h = attn(h)
    return h


class Downsample(nnx.Module):
    """Stride-2 3x3 conv (ADM `conv_resample=True`, SD-VAE `with_conv=True`).

    ADM pads 1 on every side. SD-VAE's encoder pads 0 on the top/left and 1 on the bottom/right,
    then convolves unpadded (CompVis latent-diffusion `Downsample`, diffusers `Downsample2D` with
    padding=0): `pad_bottom_right=True`. Both halve an even size with the same parameters, but
    sample at positions one pixel apart, so SD-VAE's weights reproduce SD-VAE only with its form.
    """

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs, pad_bottom_right: bool = False):
        if pad_bottom_right:
            self.conv = nnx.Conv(channels, channels, (3, 3), strides=2, padding=((0, 1), (0, 1)),
                                 dtype=dtype, rngs=rngs)
        else:
            self.conv = conv(channels, channels, 3, dtype, rngs, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class Upsample(nnx.Module):
    """Nearest 2x upsampling then a 3x3 conv (cheaper than a transposed conv, same params)."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest(x, 2))
