"""SD-VAE's conventional convolutional decoder (CompVis `post_quant_conv` + `Decoder`).

This is the paper's comparison row: same encoder, deterministic decoder, trained with
L1 + LPIPS + KL and optionally a PatchGAN.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from dgae_jax.models.layers import (Attention, ResBlock, Upsample, blocks_with_attention, conv,
                                    group_norm)


class ConvDecoder(nnx.Module):
    """z (B, h, w, c) -> image (B, h*f, w*f, 3), mirroring the encoder's levels."""

    def __init__(self, *, resolution: int, latent_channels: int, width: int,
                 channel_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], norm_groups: int, dtype, rngs: nnx.Rngs,
                 out_channels: int = 3):
        kw = dict(groups=norm_groups, dtype=dtype, rngs=rngs)
        ch = width * channel_mult[-1]
        res = resolution // 2 ** (len(channel_mult) - 1)
        self.post_quant_conv = conv(latent_channels, latent_channels, 1, dtype, rngs)
        self.conv_in = conv(latent_channels, ch, 3, dtype, rngs)
        self.mid_block1 = ResBlock(ch, ch, **kw)
        self.mid_attn = Attention(ch, **kw)
        self.mid_block2 = ResBlock(ch, ch, **kw)
        levels = []
        for i, mult in reversed(list(enumerate(channel_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch, width * mult, **kw))
                ch = width * mult
                attns.append(Attention(ch, **kw) if res in attn_resolutions else None)
            up = Upsample(ch, dtype=dtype, rngs=rngs) if i > 0 else None
            levels.append(nnx.Dict(blocks=nnx.List(blocks), attns=nnx.List(attns), up=up))
            res *= 2 if up is not None else 1
        self.levels = nnx.List(levels)
        self.norm_out = group_norm(ch, norm_groups, dtype, rngs)
        self.conv_out = conv(ch, out_channels, 3, dtype, rngs)

    def features(self, z: jax.Array) -> jax.Array:
        """Everything before `conv_out`, whose kernel SD-VAE's adaptive GAN weight looks at."""
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid_block2(self.mid_attn(self.mid_block1(h)))
        for level in self.levels:
            h = blocks_with_attention(level["blocks"], level["attns"], h)
            if level["up"] is not None:
                h = level["up"](h)
        return nnx.silu(self.norm_out(h))

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.conv_out(self.features(z))
