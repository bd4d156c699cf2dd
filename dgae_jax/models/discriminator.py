"""The PatchGAN discriminator of SD-VAE (taming-transformers `NLayerDiscriminator`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_init = nnx.initializers.normal(0.02)


class BatchStatNorm(nnx.Module):
    """BatchNorm in training mode: normalise by the statistics of the batch it is given.

    The discriminator only ever runs in training, so SD-VAE's running averages are never read;
    keeping none makes the loss a pure function. Under a sharded `jit` the mean is over the
    global batch (synchronised BatchNorm).
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.scale = nnx.Param(1.0 + 0.02 * jax.random.normal(rngs.params(), (channels,)))
        self.bias = nnx.Param(jnp.zeros((channels,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=(0, 1, 2))
        var = jnp.var(x32, axis=(0, 1, 2))
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class PatchDiscriminator(nnx.Module):
    """4x4 convs: stride 2 for `num_layers` levels then stride 1; one logit per image patch."""

    def __init__(self, *, width: int = 64, num_layers: int = 3, dtype=jnp.float32,
                 rngs: nnx.Rngs, in_channels: int = 3):
        def conv4(cin, cout, stride, bias):
            return nnx.Conv(cin, cout, (4, 4), strides=stride, padding=1, use_bias=bias,
                            kernel_init=_init, dtype=dtype, rngs=rngs)

        self.conv_in = conv4(in_channels, width, 2, True)
        convs, norms, ch = [], [], width
        for n in range(1, num_layers + 1):
            out = width * min(2 ** n, 8)
            convs.append(conv4(ch, out, 2 if n < num_layers else 1, False))
            norms.append(BatchStatNorm(out, rngs=rngs))
            ch = out
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.conv_out = conv4(ch, 1, 1, True)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.leaky_relu(self.conv_in(x), 0.2)
        for conv, norm in zip(self.convs, self.norms):
            h = nnx.leaky_relu(norm(conv(h)), 0.2)
        return self.conv_out(h).astype(jnp.float32)
