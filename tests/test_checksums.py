"""Array checksums: any changed element or position changes them, and they do not depend on the
sharding (a checkpoint saved on one mesh verifies on another)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dgae_jax import checksums
from fakes import mesh_of


def test_every_single_change_is_seen():
    x = jax.random.normal(jax.random.key(0), (6, 10), jnp.float32)
    base = checksums.array_checksum(x)
    for i, j in [(0, 0), (3, 7), (5, 9)]:
        for new in (x[i, j] + 1e-7 * abs(x[i, j]) + 1e-30, jnp.nan, -x[i, j]):
            assert not np.array_equal(checksums.array_checksum(x.at[i, j].set(new)), base)
    assert not np.array_equal(checksums.array_checksum(x.T.reshape(6, 10)), base)  # positions
    for dtype in (jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_):
        y = (x > 0) if dtype == jnp.bool_ else x.astype(dtype)
        flipped = y.at[2, 3].set(~y[2, 3] if dtype == jnp.bool_ else y[2, 3] + 1)
        assert not np.array_equal(checksums.array_checksum(y), checksums.array_checksum(flipped))


def test_numpy_sums_equal_the_device_sums():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((7, 5)).astype(np.float32), rng.integers(-9, 9, (3, 4, 2)),
              rng.standard_normal(11).astype(jnp.bfloat16), rng.integers(0, 255, 9, np.uint8),
              rng.standard_normal((2, 3)) > 0, np.float32(2.5)]
    for a in arrays:
        a = np.asarray(a, np.int32) if a.dtype == np.int64 else a
        assert checksums.host_checksum(a) == np.asarray(
            jax.jit(checksums.array_checksum)(a)).tolist(), a.dtype
    words = np.array([1.5, -2.0, 1e300])  # 8-byte elements: two words, high one mixed in
    low, high = words.view(np.uint32).reshape(-1, 2).T
    assert checksums.host_checksum(words) == checksums.host_checksum(
        low ^ checksums._fmix32(high))


def test_independent_of_sharding():
    tree = {"a": jax.random.normal(jax.random.key(1), (8, 12)),
            "b": jnp.arange(16, dtype=jnp.int32).reshape(2, 8), "c": jnp.float32(3.0)}
    want = checksums.tree_checksums(jax.device_get(tree))
    mesh = mesh_of(2, 4)
    for specs in [{"a": P("data", "fsdp"), "b": P(None, "fsdp"), "c": P()},
                  {"a": P("fsdp", None), "b": P("data", None), "c": P()}]:
        sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}
        assert checksums.tree_checksums(sharded) == want  # gathered to the host: numpy's sums
        on_devices = checksums._jitted(NamedSharding(mesh, P()))(sharded)  # what a pod runs
        assert {f"['{k}']": np.asarray(v).tolist() for k, v in on_devices.items()} == want
    assert checksums.mismatches(want, tree) == []
    assert checksums.mismatches(want, dict(tree, a=tree["a"].at[7, 11].set(0.0))) == ["['a']"]
    assert checksums.mismatches({**want, "['d']": [1, 2]}, tree) == ["['d']"]
