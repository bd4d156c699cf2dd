"""The accelerators this project reports against, in one place: each chip's dense bf16 peak, HBM
capacity and bandwidth (vendor data sheets, linked), and the Cloud TPU accelerator types
(`v5p-32`, `v5litepod-16`, `v6e-16`, ...) as the topologies libtpu compiles for.

The benchmark's MFU divides by the peak; `--mode=compile` checks memory against the capacity and
bounds a step's time by the roofline, max(FLOPs / peak, bytes / bandwidth) per chip.
"""

from __future__ import annotations

import dataclasses
import math

from dgae_jax.errors import ConfigError

GB, GIB = 1e9, 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    kinds: tuple[str, ...]  # substrings of jax's device_kind that name this chip
    peak_bf16_tflops: float  # dense, without sparsity
    hbm_bytes: float | None  # HBM is sized in binary units: a data sheet's "16 GB" is 16 GiB
    hbm_bytes_per_s: float | None
    source: str


# The first chip whose kind is found in a device_kind wins: more specific kinds come first.
CHIPS = (
    Chip("H100", ("H100",), 989, 80 * GB, 3.35e12,
         "https://www.nvidia.com/en-us/data-center/h100/ (SXM)"),
    Chip("H200", ("H200",), 989, 141 * GB, 4.8e12,
         "https://www.nvidia.com/en-us/data-center/h200/ (SXM)"),
    Chip("A100", ("A100",), 312, None, None,  # 40 and 80 GB parts share a device_kind
         "https://www.nvidia.com/en-us/data-center/a100/"),
    Chip("TPU v4", ("TPU v4",), 275, 32 * GIB, 1200 * GB,
         "https://cloud.google.com/tpu/docs/v4"),
    Chip("TPU v5e", ("TPU v5 lite", "TPU v5e"), 197, 16 * GIB, 819 * GB,
         "https://cloud.google.com/tpu/docs/v5e"),
    Chip("TPU v5p", ("TPU v5p", "TPU v5"), 459, 95 * GIB, 2765 * GB,
         "https://cloud.google.com/tpu/docs/v5p"),
    Chip("TPU v6e", ("TPU v6 lite", "TPU v6e"), 918, 32 * GIB, 1638 * GB,
         "https://cloud.google.com/tpu/docs/v6e"),
)


def chip(device_kind: str) -> Chip | None:
    """The chip of a jax device_kind, or None (CPUs and unlisted accelerators)."""
    return next((c for c in CHIPS if any(k in device_kind for k in c.kinds)), None)


def peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak of a device kind, or None."""
    found = chip(device_kind)
    return found.peak_bf16_tflops if found else None


# Cloud TPU accelerator types: '<generation>-<N>' where N counts TensorCores (two per chip on
# v5p, one on v5e and v6e), and the slice shapes the TPU docs list for each chip count.
# generation -> (libtpu's topology prefix, TensorCores per chip, {chips: shape}). v4 is left
# out: libtpu's compile-only v4 devices are its TensorCores, where a v4 run has one per chip.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
              6144: "16x16x24"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
ACCELERATORS = {"v5p": ("v5p", 2, _SHAPES_3D),
                "v5litepod": ("v5e", 1, _SHAPES_2D), "v5e": ("v5e", 1, _SHAPES_2D),
                "v6e": ("v6e", 1, _SHAPES_2D)}


def tpu_topology(name: str) -> tuple[str, int]:
    """(libtpu's topology name, chips) of a Cloud TPU accelerator type such as 'v5p-32' or
    'v5litepod-16', or of a topology given as libtpu spells it ('v5e:4x4', 'v5p:2x2x4')."""
    generation, sep, size = name.partition(":" if ":" in name else "-")
    known = sorted({g for g, _, _ in ACCELERATORS.values()} if sep == ":" else ACCELERATORS)
    if generation not in known:
        raise ConfigError(f"compile.topology={name!r}: the generation {generation!r} is not one "
                          f"of {', '.join(known)}")
    if sep == ":":
        dims = size.split("x")
        if not size or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ConfigError(f"compile.topology={name!r} is not a shape such as v5e:4x4")
        return name, math.prod(int(d) for d in dims)
    prefix, cores_per_chip, shapes = ACCELERATORS[generation]
    chips = int(size) // cores_per_chip if size.isdigit() and int(size) % cores_per_chip == 0 else 0
    if chips not in shapes:
        sizes = ", ".join(f"{generation}-{n * cores_per_chip}" for n in shapes)
        raise ConfigError(f"compile.topology={name!r} is not a slice Cloud TPU offers ({sizes}); "
                          f"other shapes as libtpu spells them, e.g. {prefix}:{shapes[16]}")
    return f"{prefix}:{shapes[chips]}", chips
