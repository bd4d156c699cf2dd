"""The torch-free TorchScript reader against PyTorch's own loader, and its refusals."""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from dgae_jax.metrics import torchscript


def saved_module(tmp_path):
    """A scripted module whose tensors cover dtypes, views, shared storage and nesting."""
    torch = pytest.importorskip("torch")

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.norm = torch.nn.BatchNorm2d(4)  # running stats and an int64 counter
            self.sizes = [1, 2, 3]  # a typed list in the pickle

        def forward(self, x):
            return self.norm(self.conv(x))

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()
            base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
            self.register_buffer("transposed", base.t())  # strides (1, 6)
            self.register_buffer("column", base[:, 2])  # offset into a shared storage
            self.register_buffer("halves", torch.linspace(-2, 2, 5).half())
            self.register_buffer("mask", torch.tensor([True, False, True]))
            self.register_buffer("scalar", torch.tensor(3.5, dtype=torch.float64))

        def forward(self, x):
            return self.inner(x)

    torch.manual_seed(0)
    path = tmp_path / "module.pt"
    torch.jit.save(torch.jit.script(Outer()), str(path))
    reference = {k: v.detach().numpy()
                 for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    return path, reference


def test_tensors_equal_pytorchs_state_dict(tmp_path):
    path, reference = saved_module(tmp_path)
    for source in [path, path.read_bytes()]:
        ours = torchscript.state_dict(torchscript.load(source))
        assert list(ours) == list(reference)
        for name, value in reference.items():
            assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
            np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert ours["transposed"].flags.owndata  # a copy, not a view of the archive's bytes


def archive_with(tmp_path, payload: bytes):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", payload)
    return path


class RunsACommand:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_foreign_globals_are_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="refusing (posix|os|nt).system"):
        torchscript.load(archive_with(tmp_path, pickle.dumps(RunsACommand(), protocol=2)))
    assert not (tmp_path / "pwned").exists()


def test_not_an_archive_or_not_a_module(tmp_path):
    with pytest.raises(zipfile.BadZipFile):
        torchscript.load(b"not a zip")
    empty = io.BytesIO()
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(pickle.UnpicklingError, match="data.pkl"):
        torchscript.load(empty.getvalue())
    with pytest.raises(pickle.UnpicklingError, match="does not hold a module"):
        torchscript.load(archive_with(tmp_path, pickle.dumps({"a": 1}, protocol=2)))
