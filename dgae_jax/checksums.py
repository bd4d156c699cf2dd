"""Checksums of sharded arrays that do not depend on how they are sharded.

A checkpoint records one per saved array and a restore recomputes it on what it read, so a
corrupted file (a flipped byte in a data file, a chunk that decompresses to garbage) is found
instead of training on NaNs. Each checksum is two wrapping uint32 sums over the array's elements
of functions of (bit pattern, flat index): sum of bits * (2 index + 1), injective in each element
because the multiplier is odd, and sum of fmix32(bits ^ fmix32(index)) (MurmurHash3's
finaliser). Integer sums are exact and order-free, so every device reduces its own shards and one
all-reduce of 8 bytes per array combines them: the cost scales with the pod, and a checkpoint
saved on one mesh verifies on another.

Arrays already in this process's host memory (numpy, or CPU arrays this process holds whole)
are summed by numpy instead, to the same values (tested): no compile of a function over
hundreds of arrays, which on a CPU costs more than the sums themselves.
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


def _fmix32(h):
    """MurmurHash3's finaliser of uint32 values (jax or numpy arrays: both wrap)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
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


def host_checksum(x: np.ndarray) -> list[int]:
    """`array_checksum` computed by numpy on the host."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        bits = x.astype(np.uint32).ravel()
    elif x.dtype.itemsize == 8:
        words = x.view(np.uint32).reshape(-1, 2)
        bits = words[:, 0] ^ _fmix32(words[:, 1])
    else:
        bits = x.view(np.dtype(f"uint{8 * x.dtype.itemsize}")).astype(np.uint32).ravel()
    index = np.arange(bits.size, dtype=np.uint64).astype(np.uint32)  # mod 2**32, as on device
    weighted = np.sum(bits * (index * np.uint32(2) + np.uint32(1)), dtype=np.uint32)
    mixed = np.sum(_fmix32(bits ^ _fmix32(index)), dtype=np.uint32)
    return [int(weighted), int(mixed)]


def _on_host(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic)) or (
        isinstance(x, jax.Array) and x.is_fully_addressable
        and all(d.platform == "cpu" for d in x.devices()))


def tree_checksums(tree: Any) -> dict[str, list[int]]:
    """{array path: [two uint32]} of every array in `tree`, the same on every process."""
    flat = [(jax.tree_util.keystr(path), x)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
    out = {key: host_checksum(np.asarray(x)) for key, x in flat if _on_host(x)}
    device = [(key, x) for key, x in flat if key not in out]
    if device:
        sharding = device[0][1].sharding
        replicated = (NamedSharding(sharding.mesh, PartitionSpec())
                      if isinstance(sharding, NamedSharding) else None)
        sums = _jitted(replicated)([x for _, x in device])
        out.update({key: [int(v) for v in np.asarray(s.addressable_data(0))]
                    for (key, _), s in zip(device, sums)})
    return {key: out[key] for key, _ in flat}


def mismatches(saved: dict[str, list[int]], tree: Any) -> list[str]:
    """The array paths of `tree` whose checksum differs from (or is missing in) `saved`."""
    got = tree_checksums(tree)
    return [path for path, value in got.items() if saved.get(path) != value] + sorted(
        set(saved) - set(got))
