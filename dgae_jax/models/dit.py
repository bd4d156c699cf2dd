"""DiT (Peebles & Xie, 2023): a class-conditional transformer on latent patches, in Flax NNX.

Patchify (a p x p stride-p conv) plus fixed 2-D sin-cos positions; the timestep (sinusoidal, into
an MLP) and class embeddings are summed into a conditioning vector c; each block is adaLN-Zero:
c regresses shift, scale and a gate for attention and for the MLP, the gates starting at zero so
every block starts as the identity; the final layer (adaLN, then a zero-initialised linear)
unpatchifies to the latent's channels, or twice as many for DiT's DDPM head with a learned
variance. Attention runs through `jax.nn.dot_product_attention`, so backends with fused attention
kernels use them. Class index `num_classes` is the "null" class that classifier-free guidance
conditions on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dgae_jax.models.layers import timestep_embedding, zeros_init

FREQUENCY_DIM = 256

xavier = nnx.initializers.xavier_uniform()
normal_002 = nnx.initializers.normal(0.02)


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """DiT/MAE fixed positional embedding (grid*grid, dim): half for rows, half for columns."""
    def one_axis(d, pos):
        omega = 1.0 / 10_000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                         indexing="ij")
    # MAE's convention: the first half encodes the column (w) index, the second the row.
    return np.concatenate([one_axis(dim // 2, xs), one_axis(dim // 2, ys)], axis=1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(dim: int, dtype, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype,
                         rngs=rngs)


def linear(cin: int, cout: int, dtype, rngs, init=xavier) -> nnx.Linear:
    return nnx.Linear(cin, cout, kernel_init=init, bias_init=zeros_init, dtype=dtype, rngs=rngs)


class DiTBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, *, dtype, rngs: nnx.Rngs, mlp_ratio: float = 4.0):
        self.heads = heads
        self.norm1 = layer_norm(dim, dtype, rngs)
        self.qkv = linear(dim, 3 * dim, dtype, rngs)
        self.proj = linear(dim, dim, dtype, rngs)
        self.norm2 = layer_norm(dim, dtype, rngs)
        hidden = int(dim * mlp_ratio)
        self.fc1 = linear(dim, hidden, dtype, rngs)
        self.fc2 = linear(hidden, dim, dtype, rngs)
        self.ada = linear(dim, 6 * dim, dtype, rngs, init=zeros_init)  # adaLN-Zero

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(nnx.silu(c)), 6, -1)
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1))
        q, k, v = jnp.split(qkv.reshape(b, n, 3 * self.heads, d // self.heads), 3, axis=2)
        attn = jax.nn.dot_product_attention(q, k, v).reshape(b, n, d)
        x = x + gate1[:, None] * self.proj(attn)
        h = self.fc2(nnx.gelu(self.fc1(modulate(self.norm2(x), shift2, scale2)),
                              approximate=True))
        return x + gate2[:, None] * h


class DiT(nnx.Module):
    """(B, H, W, C) noisy latents, times t, int labels -> (B, H, W, out_channels): a velocity
    (C channels), or epsilon and a variance interpolation (2C)."""

    def __init__(self, *, input_size: int, channels: int, num_classes: int, patch_size: int,
                 hidden: int, depth: int, heads: int, out_channels: int | None = None,
                 time_scale: float = 1000.0, dtype, rngs: nnx.Rngs):
        if input_size % patch_size:
            raise ValueError(f"patch_size={patch_size} does not divide the latent size "
                             f"{input_size}")
        if hidden % heads or (hidden // heads) % 2:
            raise ValueError(f"hidden={hidden} is not divisible into {heads} heads")
        self.patch, self.grid = patch_size, input_size // patch_size
        self.out_channels = out_channels or channels
        self.num_classes, self.time_scale = num_classes, time_scale
        # DiT initialises the patch projection like a linear layer (xavier on its flat kernel).
        fan_in = patch_size * patch_size * channels
        self.patchify = nnx.Conv(channels, hidden, (patch_size, patch_size), strides=patch_size,
                                 padding="VALID", dtype=dtype, rngs=rngs, bias_init=zeros_init,
                                 kernel_init=_flat_xavier(fan_in, hidden))
        self.time_mlp1 = linear(FREQUENCY_DIM, hidden, dtype, rngs, init=normal_002)
        self.time_mlp2 = linear(hidden, hidden, dtype, rngs, init=normal_002)
        self.label_embed = nnx.Embed(num_classes + 1, hidden, embedding_init=normal_002,
                                     dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([DiTBlock(hidden, heads, dtype=dtype, rngs=rngs)
                                for _ in range(depth)])
        self.final_norm = layer_norm(hidden, dtype, rngs)
        self.final_ada = linear(hidden, 2 * hidden, dtype, rngs, init=zeros_init)
        self.final = linear(hidden, patch_size * patch_size * self.out_channels, dtype, rngs,
                            init=zeros_init)
        self.dtype = dtype

    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        b, size = x.shape[0], x.shape[1]
        p, g = self.patch, self.grid
        h = self.patchify(x.astype(self.dtype)).reshape(b, g * g, -1)
        h = h + jnp.asarray(sincos_2d(h.shape[-1], g), h.dtype)[None]
        temb = timestep_embedding(t * self.time_scale, FREQUENCY_DIM).astype(self.dtype)
        c = self.time_mlp2(nnx.silu(self.time_mlp1(temb))) + self.label_embed(labels)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = jnp.split(self.final_ada(nnx.silu(c)), 2, axis=-1)
        h = self.final(modulate(self.final_norm(h), shift, scale))
        h = h.reshape(b, g, g, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, size, size, self.out_channels).astype(jnp.float32)


def _flat_xavier(fan_in: int, fan_out: int):
    """Xavier-uniform for a conv kernel, with the fans of the flattened linear map."""
    limit = float(np.sqrt(6.0 / (fan_in + fan_out)))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)
    return init
