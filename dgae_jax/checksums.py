"""Checksums of sharded arrays that do not depend on how they are sharded.

A checkpoint records one per saved array and a restore recomputes it on what it read, so a
corrupted file (a flipped byte in a data file, a chunk that decompresses to garbage) is found
instead of training on NaNs. Each checksum is two wrapping uint32 sums over the array's elements
of functions of (bit pattern, flat index): sum of bits * (2 index + 1), injective in each element
because the multiplier is odd, and sum of fmix32(bits ^ fmix32(index)) (MurmurHash3's
finaliser). Integer sums are exact and order-free, so every device reduces its own shards and one
all-reduce of 8 bytes per array combines them: the cost scales with the pod, and a checkpoint
saved on one mesh verifies on another.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits(x: jax.Array) -> jax.Array:
    """The bit pattern of each element as uint32, same shape."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 8:  # two words per element: fold the high one in
        words = lax.bitcast_convert_type(x, jnp.uint32)
        return words[..., 0] ^ _fmix32(words[..., 1])
    return lax.bitcast_convert_type(x, _UINT[size]).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major flat index of each element, built from per-axis iotas (no reshape, so no
    resharding of a sharded operand)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def array_checksum(x: jax.Array) -> jax.Array:
    """uint32[2] checksum of `x`'s values and positions."""
    bits, index = _bits(jnp.asarray(x)), _flat_index(jnp.shape(x))
    weighted = jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    mixed = jnp.sum(_fmix32(bits ^ _fmix32(index)), dtype=jnp.uint32)
    return jnp.stack([weighted, mixed])


@functools.lru_cache(maxsize=8)
def _jitted(out_sharding) -> Any:
    return jax.jit(lambda tree: jax.tree.map(array_checksum, tree), out_shardings=out_sharding)


def tree_checksums(tree: Any) -> dict[str, list[int]]:
    """{array path: [two uint32]} of every array in `tree`, the same on every process."""
    leaves = jax.tree.leaves(tree)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    replicated = (NamedSharding(sharding.mesh, PartitionSpec())
                  if isinstance(sharding, NamedSharding) else None)
    sums = _jitted(replicated)(tree)
    flat, _ = jax.tree_util.tree_flatten_with_path(sums)
    return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(s.addressable_data(0))]
            for path, s in flat}


def mismatches(saved: dict[str, list[int]], tree: Any) -> list[str]:
    """The array paths of `tree` whose checksum differs from (or is missing in) `saved`."""
    got = tree_checksums(tree)
    return [path for path, value in got.items() if saved.get(path) != value] + sorted(
        set(saved) - set(got))
