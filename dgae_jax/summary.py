"""`--mode=summary`: parameter counts, latent shape and train-step FLOPs, without allocating.

Everything is abstract: parameters come from `jax.eval_shape`, FLOPs from XLA's cost analysis of
the lowered (not compiled) gradient step, so the full paper models summarise in seconds on a CPU.
"""

from __future__ import annotations

import json
from collections import defaultdict

import jax
import jax.numpy as jnp
import ml_collections

from dgae_jax.autoencoder import Autoencoder


def count_by_module(params, depth: int) -> dict[str, int]:
    """Parameter counts per module path, truncated to its first `depth` components."""
    counts: dict[str, int] = defaultdict(int)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        modules = [str(getattr(k, "key", k)) for k in path][:-1]  # drop 'kernel', 'bias', ...
        counts["/".join(modules[:depth])] += leaf.size
    return dict(counts)


def train_step_flops(ae: Autoencoder, params, batch_size: int) -> float:
    """FLOPs of one loss + gradient evaluation on a global batch (XLA's HLO cost analysis)."""
    size = ae.config.image_size
    batch = {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)}
    rng = jax.eval_shape(lambda: jax.random.key(0))

    def step(ae, params, batch, rng):
        return jax.value_and_grad(Autoencoder.loss_fn, argnums=1, has_aux=True)(
            ae, params, batch, rng)

    abstract_ae = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), ae)
    cost = jax.jit(step).lower(abstract_ae, params, batch, rng).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def summarize(config: ml_collections.ConfigDict) -> dict:
    """Prints a table and returns the JSON record (whose line is printed last)."""
    ae = Autoencoder.from_config(config)
    params = jax.eval_shape(ae.init, jax.random.key(0))
    rows = count_by_module(params, depth=3)
    totals = count_by_module(params, depth=1)
    width = max(len(k) for k in rows) + 2
    print(f"{'module':<{width}}{'params':>14}")
    for name in totals:
        for k, n in rows.items():
            if k.split("/")[0] == name:
                print(f"{k:<{width}}{n:>14,}")
        print(f"{name + ' total':<{width}}{totals[name]:>14,}\n")
    flops = train_step_flops(ae, params, config.batch_size)
    record = {
        "config": config.name,
        "decoder_type": config.model.decoder,
        "image_size": config.image_size,
        "encoder_params": totals["encoder"],
        "decoder_params": totals["decoder"],
        "discriminator_params": totals.get("discriminator", 0),
        "total_params": sum(totals.values()),
        "latent_shape": list(ae.latent_shape),
        "latent_size": int(jnp.prod(jnp.array(ae.latent_shape))),
        "batch_size": config.batch_size,
        "train_step_flops": flops,
        "train_step_flops_per_image": flops / config.batch_size,
    }
    print(f"latent shape {tuple(ae.latent_shape)}; train step (loss + grad, global batch "
          f"{config.batch_size}): {flops / 1e12:.2f} TFLOPs")
    print(json.dumps(record))
    return record
