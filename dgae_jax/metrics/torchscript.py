"""The tensors of a TorchScript archive, read without PyTorch.

A TorchScript file (`torch.jit.save`) is a zip: `<name>/data.pkl` pickles the module tree (each
module an object of a `__torch__.*` class whose state is a dict of its attributes, tensors
among them as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`), and each
tensor storage is the raw little-endian bytes of `<name>/data/<key>`. The unpickler here builds
nothing but those: a module becomes a `ScriptModule` holding its state dict, a tensor a numpy
array; every other global in the pickle is refused, so reading an archive cannot run code.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile

import numpy as np

# torch's storage classes as pickled in an archive -> numpy dtypes (bfloat16 has none).
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
# TorchScript's typed-list constructors, each called with a plain list.
JIT_LISTS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")


class ScriptModule:
    """A `__torch__.*` object of the archive (a subclass named after its class) and its
    attributes."""

    state: dict = {}

    def __setstate__(self, state: dict) -> None:
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None,
                    metadata=None) -> np.ndarray:
    del requires_grad, hooks, metadata  # autograd bookkeeping: nothing to keep without torch
    itemsize = storage.dtype.itemsize
    if size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
        raise pickle.UnpicklingError(f"a tensor of shape {tuple(size)} overruns its storage")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.array(view)  # a contiguous copy, no longer tied to the storage buffer


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__."):
            return type(f"{module}.{name}", (ScriptModule,), {})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in JIT_LISTS:  # typed lists: list(values)
            return list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):  # (value, type name)
            return lambda value, _type: value
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing {module}.{name}: not a module, tensor or storage")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, type):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            self.storages[key] = np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"))
        if self.storages[key].size < numel:
            raise pickle.UnpicklingError(f"storage {key} holds fewer than {numel} elements")
        return self.storages[key]


def load(source: str | os.PathLike | bytes) -> ScriptModule:
    """The root module of the archive at `source` (a path, or the archive's bytes)."""
    with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise pickle.UnpicklingError("not a TorchScript archive: no single <name>/data.pkl")
        prefix = pickles[0].split("/")[0]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
            raise pickle.UnpicklingError("a big-endian archive")
        root = _Unpickler(archive.read(pickles[0]), archive, prefix).load()
    if not isinstance(root, ScriptModule):
        raise pickle.UnpicklingError("the archive's data.pkl does not hold a module")
    return root


def state_dict(module: ScriptModule, prefix: str = "") -> dict[str, np.ndarray]:
    """Every tensor attribute of the module tree, named as torch's `state_dict()` names them
    ('net.layers.conv.weight'), in the archive's order."""
    out = {}
    for name, value in module.state.items():
        if isinstance(value, np.ndarray):
            out[prefix + name] = value
        elif isinstance(value, ScriptModule):
            out.update(state_dict(value, f"{prefix}{name}."))
    return out

