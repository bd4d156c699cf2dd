"""DGAE's diffusion decoder: ADM's U-Net in pixel space, conditioned on the latent.

The latent z is nearest-upsampled to the image size and concatenated with x_t on channels
(paper section 3.3); the timestep enters through ADM's sinusoidal embedding + MLP and the
scale-shift norm of every ResBlock.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dgae_jax.models.layers import (Attention, Downsample, ResBlock, Upsample, conv, group_norm,
                                    timestep_embedding, upsample_nearest)

# ADM's channel_mult per image size (guided-diffusion `create_model`).
ADM_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                    64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


# What `remat` recomputes in the backward pass instead of keeping from the forward.
REMAT = ("none", "attention", "blocks")


def _call(module, *args):
    return module(*args)


class UNet(nnx.Module):
    """v_hat = UNet(x_t, t, z): velocity prediction for x_t (B, H, W, 3) given z (B, h, w, c).

    `t` is rectified-flow time in [0, 1]; it is multiplied by `time_scale` before the sinusoidal
    embedding so the embedding sees ADM's usual [0, 1000) range.

    `remat` trades compute for memory in training: 'attention' recomputes each attention block
    (its H*W x H*W scores are the largest activations at 16 px), 'blocks' every ResBlock and
    attention block, 'none' nothing. `attention` picks `jax.nn.dot_product_attention`'s
    implementation: None lets JAX choose, 'cudnn' forces cuDNN's fused kernel (NVIDIA GPUs,
    bf16/fp16), 'xla' the portable one.
    """

    def __init__(self, *, resolution: int, latent_channels: int, width: int,
                 channel_mult: Sequence[float], num_res_blocks: int,
                 attn_resolutions: Sequence[int], head_channels: int, norm_groups: int,
                 dtype, rngs: nnx.Rngs, out_channels: int = 3, time_scale: float = 1000.0,
                 remat: str = "none", attention: str | None = None):
        if remat not in REMAT:
            raise ValueError(f"remat={remat!r} is not one of {', '.join(REMAT)}")
        kw = dict(groups=norm_groups, dtype=dtype, rngs=rngs)
        emb_dim = 4 * width
        self.time_scale = time_scale
        self.width = width
        self.remat = remat
        self.time_mlp1 = nnx.Linear(width, emb_dim, dtype=dtype, rngs=rngs)
        self.time_mlp2 = nnx.Linear(emb_dim, emb_dim, dtype=dtype, rngs=rngs)
        widths = [int(width * m) for m in channel_mult]

        def attention_at(ch, res):
            return (Attention(ch, head_channels=head_channels, zero_out=True,
                              implementation=attention, **kw)
                    if res in attn_resolutions else None)

        self.conv_in = conv(out_channels + latent_channels, widths[0], 3, dtype, rngs)
        ch, res, skips = widths[0], resolution, [widths[0]]
        down = []
        for i, w in enumerate(widths):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, w, emb_dim=emb_dim, **kw))
                ch = w
                attns.append(attention_at(ch, res))
                skips.append(ch)
            sample = None
            if i < len(widths) - 1:
                sample = Downsample(ch, dtype=dtype, rngs=rngs)
                skips.append(ch)
                res //= 2
            down.append(nnx.Dict(blocks=nnx.List(blocks), attns=nnx.List(attns), sample=sample))
        self.down = nnx.List(down)
        self.mid_block1 = ResBlock(ch, ch, emb_dim=emb_dim, **kw)
        self.mid_attn = Attention(ch, head_channels=head_channels, zero_out=True,
                                  implementation=attention, **kw)
        self.mid_block2 = ResBlock(ch, ch, emb_dim=emb_dim, **kw)
        up = []
        for i, w in reversed(list(enumerate(widths))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch + skips.pop(), w, emb_dim=emb_dim, **kw))
                ch = w
                attns.append(attention_at(ch, res))
            sample = None
            if i > 0:
                sample = Upsample(ch, dtype=dtype, rngs=rngs)
                res *= 2
            up.append(nnx.Dict(blocks=nnx.List(blocks), attns=nnx.List(attns), sample=sample))
        self.up = nnx.List(up)
        self.norm_out = group_norm(ch, norm_groups, dtype, rngs)
        self.conv_out = conv(ch, out_channels, 3, dtype, rngs, zero=True)

    def _block(self, block, h, emb):
        call = nnx.remat(_call) if self.remat == "blocks" else _call
        return call(block, h, emb)

    def _attention(self, attn, h):
        call = nnx.remat(_call) if self.remat != "none" else _call
        return call(attn, h)

    def __call__(self, x_t: jax.Array, t: jax.Array, z: jax.Array) -> jax.Array:
        emb = timestep_embedding(t * self.time_scale, self.width)
        emb = self.time_mlp2(nnx.silu(self.time_mlp1(emb)))
        factor = x_t.shape[1] // z.shape[1]
        h = jnp.concatenate([x_t, upsample_nearest(z, factor).astype(x_t.dtype)], axis=-1)
        h = self.conv_in(h)
        skips = [h]
        for level in self.down:
            for block, attn in zip(level["blocks"], level["attns"]):
                h = self._block(block, h, emb)
                if attn is not None:
                    h = self._attention(attn, h)
                skips.append(h)
            if level["sample"] is not None:
                h = level["sample"](h)
                skips.append(h)
        h = self._attention(self.mid_attn, self._block(self.mid_block1, h, emb))
        h = self._block(self.mid_block2, h, emb)
        for level in self.up:
            for block, attn in zip(level["blocks"], level["attns"]):
                h = self._block(block, jnp.concatenate([h, skips.pop()], axis=-1), emb)
                if attn is not None:
                    h = self._attention(attn, h)
            if level["sample"] is not None:
                h = level["sample"](h)
        return self.conv_out(nnx.silu(self.norm_out(h)))
