"""Times one AdamW step of our ADM U-Net against diffusers' `UNet2DModel` of the same shape.

Both sides get the same model (parameter counts are printed and must agree), the same float32
inputs (x_t concatenated with the nearest-upsampled latent), an MSE loss on the output and one
AdamW update, on the same CPU cores. Each side runs in its own process, one after the other, so
neither framework's thread pool competes with the other's. The ratio is ours / diffusers'.

    python benchmarks/unet_vs_diffusers.py --size=demo      # width 32, 64 px, batch 8
    python benchmarks/unet_vs_diffusers.py --size=B         # DGAE-B: width 128, 256 px, batch 1

Needs the test extra (torch, diffusers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

# name: (resolution, batch, width, channel_mult, num_res_blocks, attention resolutions,
#        head channels, norm groups, latent channels, latent size)
SIZES = {
    "demo": (64, 8, 32, (1, 2, 3, 4), 2, (16, 8), 32, 32, 16, 4),
    "B": (256, 1, 128, (1, 1, 2, 2, 4, 4), 2, (16, 8), 64, 32, 16, 16),
}


def jax_side(size: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dgae_jax.models.unet import UNet

    res, batch, width, mult, blocks, attn, head, groups, lc, ls = SIZES[size]
    model = UNet(resolution=res, latent_channels=lc, width=width, channel_mult=mult,
                 num_res_blocks=blocks, attn_resolutions=attn, head_channels=head,
                 norm_groups=groups, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-4, weight_decay=0.0)
    opt = tx.init(params)

    def step(params, opt, x, t, z, target):
        def loss(p):
            return jnp.mean((nnx.merge(graphdef, p)(x, t, z) - target) ** 2)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    rng = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(rng[0], (batch, res, res, 3))
    z = jax.random.normal(rng[1], (batch, ls, ls, lc))
    t = jax.random.uniform(rng[2], (batch,))
    target = jax.random.normal(rng[3], (batch, res, res, 3))
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, x, t, z, target).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        params, opt, value = compiled(params, opt, x, t, z, target)
        value.block_until_ready()
        times.append(time.perf_counter() - start)
    count = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {"params": int(count), "compile_s": compile_s, "step_s": statistics.median(times[1:])}


def torch_side(size: str, steps: int) -> dict:
    import os

    import torch
    from diffusers import UNet2DModel

    torch.set_num_threads(os.cpu_count())
    res, batch, width, mult, blocks, attn, head, groups, lc, ls = SIZES[size]
    widths = [width * m for m in mult]
    resolutions = [res // 2**i for i in range(len(mult))]
    down = ["AttnDownBlock2D" if r in attn else "DownBlock2D" for r in resolutions]
    up = ["AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(resolutions)]
    model = UNet2DModel(sample_size=res, in_channels=3 + lc, out_channels=3,
                        block_out_channels=widths, layers_per_block=blocks,
                        down_block_types=down, up_block_types=up, attention_head_dim=head,
                        norm_num_groups=groups, attn_norm_num_groups=groups, norm_eps=1e-6,
                        resnet_time_scale_shift="scale_shift",
                        downsample_type="conv", upsample_type="conv")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=gen)
    z = torch.randn(batch, lc, ls, ls, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    target = torch.randn(batch, 3, res, res, generator=gen)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        inputs = torch.cat([x, torch.nn.functional.interpolate(z, scale_factor=res // ls)], 1)
        loss = torch.mean((model(inputs, t).sample - target) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    count = sum(p.numel() for p in model.parameters())
    return {"params": int(count), "step_s": statistics.median(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side = jax_side if args.side == "jax" else torch_side
        print(json.dumps(side(args.size, args.steps)))
        return
    results = {}
    for side in ("jax", "torch"):
        out = subprocess.run([sys.executable, __file__, f"--size={args.size}",
                              f"--steps={args.steps}", f"--side={side}"],
                             check=True, capture_output=True, text=True).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
        print(f"{side:>5}: {results[side]}", flush=True)
    if results["jax"]["params"] != results["torch"]["params"]:
        sys.exit(f"the two models differ: {results['jax']['params']} vs "
                 f"{results['torch']['params']} parameters")
    ratio = results["jax"]["step_s"] / results["torch"]["step_s"]
    print(json.dumps({"size": args.size, "params": results["jax"]["params"],
                      "jax_step_s": round(results["jax"]["step_s"], 3),
                      "diffusers_step_s": round(results["torch"]["step_s"], 3),
                      "ratio": round(ratio, 2)}))


if __name__ == "__main__":
    main()
