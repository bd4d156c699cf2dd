"""Device mesh, config-driven sharding rules, and global batch assembly.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose
devices also split the large parameters and their optimiser state). A batch is split over both
axes; parameters follow regex rules from config, first match wins (big_vision style):

    config.sharding.rules = (("discriminator/.*", "replicate"), (".*", "fsdp"))

A rule is "fsdp" (shard the largest dimension divisible by the fsdp axis size, for arrays of at
least `config.sharding.min_fsdp_size` elements), "replicate", or an explicit PartitionSpec as a
tuple such as (None, None, None, "fsdp"). Models carry no mesh logic.
"""

from __future__ import annotations

import math
import os
import re

import jax
import ml_collections
from absl import logging
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dgae_jax.errors import ConfigError

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the batch dimension is split over every device


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def initialize_distributed() -> None:
    """Joins the multi-process job when a cluster is detected (TPU pod, SLURM, MPI) or when
    JAX_COORDINATOR_ADDRESS is set, with JAX_NUM_PROCESSES and JAX_PROCESS_ID (JAX reads the
    address itself but not these two); otherwise a single process continues alone.

    A process that names a coordinator but cannot join it stops: run alone, every process of
    the job would be process 0 of 1 and write the same run directory as its only writer."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        count, index = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
        try:
            jax.distributed.initialize(num_processes=count, process_id=index)
        except ValueError as e:  # raised at once for missing or inconsistent settings
            raise ConfigError(f"JAX_COORDINATOR_ADDRESS is set but the job cannot start ({e}): "
                              "set JAX_NUM_PROCESSES and JAX_PROCESS_ID as well") from None
    else:
        try:
            jax.distributed.initialize()
        except ValueError:  # raised at once when no cluster environment is found
            logging.info("one process: no TPU pod, SLURM or MPI job found, and "
                         "JAX_COORDINATOR_ADDRESS is not set")
            return
    logging.info("process %d of %d, %d of %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """`mesh_config.data` x `mesh_config.fsdp` devices; one of them may be -1 (fill the rest).

    With `mesh_config.dcn_data` = S > 1 the mesh is hybrid: the data axis spans S slices (TPU
    multislice, linked by the slower data-centre network) and every fsdp group, whose
    all-gathers run every step, stays inside one slice. Devices without a `slice_index` (GPU
    hosts) count each process as a slice.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = [mesh_config.data, mesh_config.fsdp]
    if shape.count(-1) > 1:
        raise ConfigError("mesh: only one of mesh.data and mesh.fsdp may be -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices cannot be split into {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ConfigError(f"mesh.data x mesh.fsdp = {shape[0]} x {shape[1]} does not match the "
                         f"{len(devices)} devices")
    slices = int(mesh_config.get("dcn_data", 1))
    if slices == 1:
        return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * 2,
                             devices=devices)
    return jax.sharding.Mesh(hybrid_device_grid(shape, slices, devices), AXES,
                             axis_types=(AxisType.Auto,) * 2)


def local_mesh() -> jax.sharding.Mesh:
    """All of this process's devices on the data axis: for work that needs no collectives
    (encoding a cache, the Python API), whatever mesh the run trained on."""
    return make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), jax.local_devices())


def hybrid_device_grid(shape: list[int], slices: int, devices) -> np.ndarray:
    """The (data, fsdp) array of devices whose data axis is `slices` blocks, one per slice."""
    granule = "slice_index" if hasattr(devices[0], "slice_index") else "process_index"
    found = len({getattr(d, granule) for d in devices})
    if found != slices:
        raise ConfigError(f"mesh.dcn_data={slices}, but the {len(devices)} devices are in "
                          f"{found} slice(s) (by {granule})")
    if shape[0] % slices:
        raise ConfigError(f"mesh.data={shape[0]} is not divisible by mesh.dcn_data={slices}")
    return mesh_utils.create_hybrid_device_mesh(
        (shape[0] // slices, shape[1]), (slices, 1), devices,
        process_is_granule=granule == "process_index")


def path_name(path) -> str:
    """'params/encoder/conv_in/kernel' for a pytree key path."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def _spec(rule, shape: tuple[int, ...], mesh, min_fsdp_size: int) -> P:
    if rule == "replicate":
        return P()
    if rule == "fsdp":
        n = mesh.shape["fsdp"]
        if n == 1 or math.prod(shape) < min_fsdp_size:
            return P()
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % n == 0:
                return P(*([None] * dim + ["fsdp"]))
        return P()
    return P(*rule)


def tree_shardings(tree, mesh, sharding_config: ml_collections.ConfigDict):
    """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs) by its path."""
    rules = [(re.compile(pattern), rule) for pattern, rule in sharding_config.rules]

    def leaf_sharding(path, leaf):
        name = path_name(path)
        for pattern, rule in rules:
            if pattern.search(name):
                spec = _spec(rule, tuple(leaf.shape), mesh, sharding_config.min_fsdp_size)
                return NamedSharding(mesh, spec)
        raise ConfigError(f"sharding.rules: no rule matches {name!r}; end them with ('.*', ...)")

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract(tree, sharding):
    """ShapeDtypeStructs of a tree's arrays, every one placed by `sharding`: arguments to lower a
    function for a mesh without allocating (`--mode=compile`)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def global_batch(local_batch: dict, mesh) -> dict:
    """Per-process numpy batch -> global arrays split over the batch axes of the mesh. Text
    fields (such as the paths of replaced images) are host metadata and stay behind."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items() if np.asarray(v).dtype.kind not in "USO"}


def shard_host_batch(host_batch: dict, mesh) -> dict:
    """The same global numpy batch on every process -> global arrays split over the batch axes
    (each process places only the rows of its own devices)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_callback(np.shape(v), sharding, lambda i, v=v: np.asarray(v)[i])
            for k, v in host_batch.items()}
