"""Tiled encode and decode (tiling.py through api.py): the blend against closed forms, the tiled
sampler against the untiled one, one tile against the untiled path, seams, any image size, float16,
and one compilation per tile shape. The networks have synthetic weights: what is checked is the
tiling, not the quality of a model."""

import types

import numpy as np
import pytest

from dgae_jax import api, diffusion, tiling, validation
from dgae_jax.errors import ConfigError

from helpers import demo_config, photo_crops, save_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """configs/f16.py:demo at 32 px (2x2x16 latents), synthetic weights; tiles of 32 px."""
    workdir = tmp_path_factory.mktemp("tiling") / "run"
    save_run(workdir, demo_config(**{"diffusion.sample_steps": 2}), 5)
    return types.SimpleNamespace(workdir=workdir, ae=api.load(workdir))


@pytest.fixture(scope="module")
def ae(run):
    return run.ae


@pytest.fixture(scope="module")
def photo():
    return photo_crops(1, 96, dtype=np.uint8)[0]


@pytest.mark.parametrize("length,tile,overlap", [(10, 4, 1), (9, 4, 2), (4, 4, 1), (3, 4, 1),
                                                 (100, 8, 2)])
def test_tiles_cover_the_plane_with_at_least_the_overlap(length, tile, overlap):
    s = tiling.starts(length, tile, overlap)
    assert s[0] == 0 and s[-1] + tile >= length
    assert all(b - a <= tile - overlap for a, b in zip(s, s[1:]))


def test_the_blend_of_a_tiling_of_any_plane_is_that_plane():
    """Each tile returning its own input (at 1 and at 4 samples per latent position) must give
    the plane back: windows normalised, tiles cut and put back at their places."""
    rng = np.random.default_rng(0)
    grid = tiling.Grid(11, 7, 4, 1)
    for scale in (1, 4):
        plane = rng.standard_normal((11 * scale, 7 * scale, 3)).astype(np.float32)
        out = grid.map(lambda tiles: tiles, [(plane, scale)], scale, batch=3)
        np.testing.assert_allclose(out, plane, rtol=1e-6, atol=1e-6)


def test_the_tiled_sampler_is_the_untiled_one_for_a_local_velocity():
    """With a velocity that depends on each position alone (no context to lose at a tile's
    edge), the blended trajectory is the untiled one to float32 rounding, Heun and Euler."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((6, 5, 2)).astype(np.float32)
    noise = rng.standard_normal((24, 20, 3)).astype(np.float32)

    def velocity(x, t, z):  # x (B, h*4, w*4, 3), z (B, h, w, 2)
        up = np.repeat(np.repeat(z, 4, axis=1), 4, axis=2)
        return np.tanh(x) * (1 + t) - up[..., :1] + up[..., 1:] * t

    for sampler in diffusion.SAMPLERS:
        tiled = tiling.decode_flow(velocity, tiling.Grid(6, 5, 2, 1), z, noise, 4, steps=2,
                                   sampler=sampler, spacing="uniform", batch=4)
        untiled = np.asarray(diffusion.sample(  # 2 steps: a Python loop, concrete arrays
            lambda x, t: velocity(np.asarray(x), np.asarray(t)[0], z[None]), noise[None], 2,
            sampler))[0]
        np.testing.assert_allclose(tiled, untiled, atol=1e-5)


def test_one_tile_is_the_untiled_path(ae, photo):
    """A tile the size of the image has a window of 1 everywhere, so the tiled path computes
    what the untiled one does, batch for batch: equal to the last bit (on XLA:CPU; another
    backend may fuse the untiled reconstruction's encode and decode differently)."""
    x = photo[:32, :32]
    np.testing.assert_array_equal(ae.encode(x, tile=32), ae.encode(x, tile=0))
    np.testing.assert_array_equal(ae.reconstruct(x, tile=32), ae.reconstruct(x, tile=0))
    z = ae.encode(x)
    np.testing.assert_array_equal(ae.decode(z, tile=32), ae.decode(z, tile=0))


def seam_ratio(image: np.ndarray, borders: list[int]) -> float:
    """Mean |horizontal gradient| across the given columns over that across all others."""
    g = np.abs(np.diff(image.astype(np.float64), axis=1)).mean(axis=(0, 2))  # g[c - 1]: at c
    at = [c - 1 for c in borders]
    return g[at].mean() / np.delete(g, at).mean()


def test_no_seams_where_stitched_tiles_show_them(ae, photo):
    """The gradient across tile borders is within 10% of the interior's for the blended tiles,
    while the same tiles decoded apart and put side by side break that bound (so the measure
    sees a seam when there is one)."""
    tiled = ae.reconstruct(photo, tile=32)[0]
    grid = tiling.Grid(6, 6, 2, 1)
    edges = sorted({x * 16 + e for _, x, _, _ in grid.boxes for e in (0, 32)} - {0, 96})
    assert abs(seam_ratio(tiled, edges) - 1) < 0.1
    stitched = np.concatenate([np.concatenate([ae.reconstruct(photo[i:i + 32, j:j + 32],
                                                              tile=0)[0]
                                               for j in range(0, 96, 32)], axis=1)
                               for i in range(0, 96, 32)])
    assert abs(seam_ratio(stitched, [32, 64]) - 1) > 0.1


def test_any_size_is_the_reflect_padded_image_cropped(ae, photo):
    """A 50 x 70 image comes back 50 x 70, its pixel (i, j) the reconstruction of the input's
    (i, j): what the padded 64 x 80 image gives, cropped."""
    x = photo[:50, :70]
    padded = np.pad(x, ((0, 14), (0, 10), (0, 0)), mode="reflect")
    for tile in (0, 32):
        out = ae.reconstruct(x, tile=tile)[0]
        assert out.shape == (50, 70, 3)
        np.testing.assert_array_equal(out, ae.reconstruct(padded, tile=tile)[0][:50, :70])
    z = ae.encode(x, tile=0)
    assert z.shape == (1, 4, 5, 16)
    np.testing.assert_array_equal(z, ae.encode(padded, tile=0))


def test_float16_is_finite_and_near_float32(run, photo):
    """docs/api.md's table bounds float16 at 2 levels and 60 dB against float32 on a trained model;
    here, on synthetic weights, at most 3 levels and 50 dB."""
    ae, half = run.ae, api.load(run.workdir, dtype="float16")
    assert half.config.model.dtype == "float16" and ae.config.model.dtype == "float32"
    assert np.all(np.isfinite(half.encode(photo)))
    full, low = (m.reconstruct(photo)[0].astype(np.float64) for m in (ae, half))
    assert np.abs(full - low).max() <= 3
    assert 10 * np.log10(255**2 / np.mean((full - low) ** 2)) > 50
    with pytest.raises(ConfigError, match="dtype='float8' is not one of"):
        api.load(run.workdir, dtype="float8")


def test_a_second_image_size_compiles_nothing(ae, photo):
    z = ae.encode(photo, tile=32)  # 96 x 96
    ae.decode(z[:, :4, :5], tile=32)  # 64 x 80
    compiled = ae._tile_velocity._cache_size(), ae._tile_moments._cache_size()
    ae.decode(z, tile=32)  # 96 x 96
    ae.encode(photo[:80, :64], tile=32)
    assert (ae._tile_velocity._cache_size(), ae._tile_moments._cache_size()) == compiled
    with pytest.raises(ConfigError, match="tile=24 is not None, 0 or a multiple of 16"):
        ae.decode(z, tile=24)


def test_reconstruct_mode_checks_its_tile_and_dtype(tmp_path):
    cfg = demo_config()
    cfg.reconstruct.update(input=str(tmp_path), output=str(tmp_path / "out"), tile=24)
    with pytest.raises(ConfigError, match="reconstruct.tile=24 is not None, 0 or a multiple"):
        validation.validate(cfg, "reconstruct", workdir=str(tmp_path), device_count=8)
    cfg.reconstruct.update(tile=0, dtype="half")
    with pytest.raises(ConfigError, match="reconstruct.dtype='half' is not one of"):
        validation.validate(cfg, "reconstruct", workdir=str(tmp_path), device_count=8)


def test_the_conv_baseline_tiles_too(tmp_path, photo):
    """The SD-VAE decoder blends its tiles' pixels once: one tile is the untiled decode, and a
    larger latent decodes in tiles to its own size."""
    save_run(tmp_path / "conv", demo_config(**{"model.decoder": "conv"}), 5)
    conv = api.load(tmp_path / "conv")
    z = conv.encode(photo[:64, :48], tile=0)
    np.testing.assert_array_equal(conv.decode(z[:, :2, :2], tile=32),
                                  conv.decode(z[:, :2, :2], tile=0))
    assert conv.decode(z).shape == (1, 64, 48, 3)  # above the training size: tiled
