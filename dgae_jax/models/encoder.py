"""The SD-VAE convolutional encoder (CompVis `Encoder` + `quant_conv`), kept as DGAE keeps it."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from dgae_jax.models.layers import (Attention, Downsample, ResBlock, blocks_with_attention, conv,
                                    group_norm)


class Encoder(nnx.Module):
    """Image (B, H, W, 3) -> posterior moments (B, H/f, W/f, 2c), f = 2**(len(channel_mult)-1).

    Each level has `num_res_blocks` ResBlocks (attention after each where the feature map is in
    `attn_resolutions`) and a stride-2 conv except the last (padded on the bottom/right only, as
    in SD-VAE, so that its weights reproduce it; see `Downsample`); then a
    ResBlock-attention-ResBlock middle, GroupNorm-SiLU-conv to 2c channels, and SD-VAE's 1x1
    `quant_conv`.
    """

    def __init__(self, *, resolution: int, latent_channels: int, width: int,
                 channel_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], norm_groups: int, dtype, rngs: nnx.Rngs,
                 in_channels: int = 3):
        kw = dict(groups=norm_groups, dtype=dtype, rngs=rngs)
        self.conv_in = conv(in_channels, width * channel_mult[0], 3, dtype, rngs)
        levels, ch, res = [], width * channel_mult[0], resolution
        for i, mult in enumerate(channel_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, width * mult, **kw))
                ch = width * mult
                attns.append(Attention(ch, **kw) if res in attn_resolutions else None)
            down = (Downsample(ch, dtype=dtype, rngs=rngs, pad_bottom_right=True)
                    if i < len(channel_mult) - 1 else None)
            levels.append(nnx.Dict(blocks=nnx.List(blocks), attns=nnx.List(attns), down=down))
            res //= 2 if down is not None else 1
        self.levels = nnx.List(levels)
        self.mid_block1 = ResBlock(ch, ch, **kw)
        self.mid_attn = Attention(ch, **kw)
        self.mid_block2 = ResBlock(ch, ch, **kw)
        self.norm_out = group_norm(ch, norm_groups, dtype, rngs)
        self.conv_out = conv(ch, 2 * latent_channels, 3, dtype, rngs)
        self.quant_conv = conv(2 * latent_channels, 2 * latent_channels, 1, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.levels:
            h = blocks_with_attention(level["blocks"], level["attns"], h)
            if level["down"] is not None:
                h = level["down"](h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h)))
        return self.quant_conv(self.conv_out(nnx.silu(self.norm_out(h))))
