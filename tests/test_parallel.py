"""Meshes: the hybrid (multislice) layout keeps fsdp groups inside a slice."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from dgae_jax import parallel
from dgae_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What mesh construction reads of a device: its id, slice and host."""

    id: int
    slice_index: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def fake_devices(slices: int, per_slice: int, hosts_per_slice: int = 2):
    devices = [FakeDevice(s * per_slice + i, s, s * hosts_per_slice + i * hosts_per_slice //
                          per_slice) for s in range(slices) for i in range(per_slice)]
    return devices[::2] + devices[1::2]  # any order: the grid must regroup them by slice


@pytest.mark.parametrize("slices,per_slice,data,fsdp", [(2, 4, -1, 2), (2, 8, 4, 4),
                                                        (4, 4, 16, 1)])
def test_hybrid_grid_spans_slices_on_data_and_keeps_fsdp_inside(slices, per_slice, data, fsdp):
    devices = fake_devices(slices, per_slice)
    shape = [data if data != -1 else slices * per_slice // fsdp, fsdp]
    grid = parallel.hybrid_device_grid(shape, slices, devices)
    assert grid.shape == tuple(shape)
    assert sorted(d.id for d in grid.flat) == list(range(slices * per_slice))
    for row in grid:  # an fsdp group: one slice
        assert len({d.slice_index for d in row}) == 1
    rows = shape[0] // slices  # the data axis: consecutive blocks of rows, one slice each
    for s in range(slices):
        assert {d.slice_index for d in grid[s * rows:(s + 1) * rows].flat} == {s}


def test_hybrid_grid_refuses_a_slice_count_the_devices_do_not_have():
    with pytest.raises(ConfigError, match=r"mesh.dcn_data=4, but the 8 devices are in 2 slice"):
        parallel.hybrid_device_grid([8, 1], 4, fake_devices(2, 4))
    with pytest.raises(ConfigError, match=r"mesh.data=3 is not divisible by mesh.dcn_data=2"):
        parallel.hybrid_device_grid([3, 1], 2, fake_devices(2, 3))


def test_devices_without_slices_count_processes():
    """One process here: a two-slice mesh is refused, a one-slice mesh is the plain one."""
    config = ml_collections.ConfigDict(dict(data=-1, fsdp=2, dcn_data=2))
    with pytest.raises(ConfigError, match=r"8 devices are in 1 slice\(s\) \(by process_index\)"):
        parallel.make_mesh(config)
    config.dcn_data = 1
    mesh = parallel.make_mesh(config)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    np.testing.assert_array_equal(mesh.devices.flat, jax.devices())
