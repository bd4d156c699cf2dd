"""The accelerator table: device kinds find their own chip, and Cloud TPU accelerator types name
the topologies (and chip counts) the TPU docs give them, which libtpu then builds."""

import pytest

from dgae_jax import chips
from dgae_jax.errors import ConfigError


def test_the_most_specific_device_kind_wins():
    """Kinds are looked up as substrings of jax's device_kind and the first chip found wins, so
    each kind must come before the kinds it contains ('TPU v5 lite' before 'TPU v5') and find
    its own chip. (The figures themselves are data-sheet values, not restated here.)"""
    kinds = [(k, c) for c in chips.CHIPS for k in c.kinds]
    order = [k for k, _ in kinds]
    for kind, chip in kinds:
        contained = [other for other in order if other != kind and other in kind]
        assert all(order.index(other) > order.index(kind) for other in contained), kind
        assert chips.chip(kind) is chip and chips.peak_tflops(kind) == chip.peak_bf16_tflops
    assert chips.chip("cpu") is None and chips.peak_tflops("cpu") is None
    for kind in ("TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite"):  # what libtpu reports
        assert chips.chip(kind).hbm_bytes and chips.chip(kind).hbm_bytes_per_s, kind


@pytest.mark.parametrize("name, topology, count", [
    ("v5p-32", "v5p:2x2x4", 16), ("v5p-8", "v5p:2x2x1", 4), ("v5p-64", "v5p:2x4x4", 32),
    ("v5litepod-16", "v5e:4x4", 16), ("v5e-16", "v5e:4x4", 16), ("v5litepod-8", "v5e:2x4", 8),
    ("v6e-16", "v6e:4x4", 16), ("v6e-256", "v6e:16x16", 256),
    ("v5e:2x2", "v5e:2x2", 4), ("v5p:2x2x2", "v5p:2x2x2", 8)])
def test_accelerator_types_name_their_topologies(name, topology, count):
    from jax.experimental import topologies
    assert chips.tpu_topology(name) == (topology, count)
    devices = topologies.get_topology_desc(topology, "tpu").devices
    assert len(devices) == count


@pytest.mark.parametrize("name, says", [
    ("v5p-33", "is not a slice Cloud TPU offers"), ("v5p-12", "is not a slice Cloud TPU offers"),
    ("v7-8", "the generation 'v7' is not one of"), ("v5e:4xq", "is not a shape such as"),
    ("v5litepod:4x4", "the generation 'v5litepod' is not one of"), ("h100-8", "generation"),
    ("v4-8", "the generation 'v4' is not one of")])
def test_unknown_accelerators_are_refused(name, says):
    with pytest.raises(ConfigError, match=f"compile.topology={name!r}.*{says}"):
        chips.tpu_topology(name)
