"""Real-world image files: every mode becomes upright 8-bit RGB, and unreadable files are skipped
(replaced, logged, counted, listed, limited) or stop the run, in training, evaluation and the
trainer itself."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from dgae_jax import trainer
from dgae_jax.data import bad_images, pipeline, sources
from dgae_jax.data.images import decode_image_file
from dgae_jax.errors import BadImage, TooManyBadImages
from fakes import SyntheticLatentTask, ldm_train_config, mesh_of
from helpers import folder_config, take, write_image


def save(image: Image.Image, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return str(path)


def test_every_mode_becomes_upright_rgb(tmp_path):
    rows, cols = np.mgrid[:24, :40]
    gradient = (5 * rows + 3 * cols).astype(np.uint8)  # smooth: JPEG keeps it
    rgb = np.stack([gradient, 255 - gradient, np.full_like(gradient, 60)], axis=-1)
    cases = {
        "gray.png": (Image.fromarray(gradient), {}),
        "palette.png": (Image.fromarray(rgb).quantize(16), {}),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), {"quality": 95}),
        "small.png": (Image.fromarray(rgb[:5, :7]), {}),
    }
    for name, (image, kwargs) in cases.items():
        out = decode_image_file(save(image, tmp_path / name, **kwargs))
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, name
        assert out.shape[:2] == image.size[::-1], name
    np.testing.assert_array_equal(decode_image_file(str(tmp_path / "gray.png"))[..., 1], gradient)
    cmyk = decode_image_file(str(tmp_path / "cmyk.jpg")).astype(int)
    assert np.abs(cmyk - rgb).mean() < 4  # JPEG's loss only

    # 16-bit grayscale: v / 257, rounded (65535 -> 255, 257 * 128 -> 128).
    values = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)
    out = decode_image_file(save(Image.fromarray(values), tmp_path / "deep.png"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 4])

    # Alpha over white: opaque red stays red, fully transparent becomes white.
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[1, 1] = (0, 0, 255, 0)
    out = decode_image_file(save(Image.fromarray(rgba), tmp_path / "alpha.png"))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[1, 1], [255, 255, 255])

    # EXIF orientation 6 (stored rotated 90 degrees clockwise): decoded upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(rgb)  # 24 x 40 as stored
    out = decode_image_file(save(stored, tmp_path / "phone.jpg", exif=exif, quality=95))
    plain = decode_image_file(save(stored, tmp_path / "plain.jpg", quality=95))
    np.testing.assert_array_equal(out, np.rot90(plain, k=-1))  # turned clockwise


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"), (b"GIF89a garbage", "UnidentifiedImageError"), ("truncated", "OSError")])
def test_unreadable_files_raise_naming_them(tmp_path, content, reason):
    if content == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(buffer, "PNG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(BadImage, match=rf"cannot decode image '.*bad.png': {reason}") as error:
        decode_image_file(str(path))
    assert error.value.path == str(path) and "\n" not in str(error.value)


@pytest.fixture
def folder_with_bad(tmp_path):
    """train: 6 readable images in 2 classes plus an empty and a garbage file; val: 3 + 1."""
    root = tmp_path / "data"
    for k in range(6):
        write_image(root / "train" / f"c{k % 2}" / f"im{k}.png", 30 + k, 40, k)
    (root / "train" / "c0" / "im2b.png").write_bytes(b"")
    (root / "train" / "c1" / "zz.jpg").write_bytes(b"not a jpeg")
    for k in range(3):
        write_image(root / "val" / "a" / f"v{k}.png", 36, 36, 50 + k)
    (root / "val" / "a" / "v1b.png").write_bytes(b"broken")
    return root


def test_training_replaces_unreadable_images_deterministically(folder_with_bad, caplog):
    cfg = folder_config(folder_with_bad, batch=8)
    with caplog.at_level(logging.WARNING):
        a = take(pipeline.train_dataset(cfg), 4)
    messages = [r.getMessage() for r in caplog.records]
    b = take(pipeline.train_dataset(cfg), 4)
    for x, y in zip(a, b):  # the same stream again, substitutes included
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    paths = np.concatenate([x["bad_path"] for x in a])
    ids = np.concatenate([x["id"] for x in a])
    bad = {p for p in paths if p}
    assert {p.rsplit("/", 1)[1] for p in bad} == {"im2b.png", "zz.jpg"}
    assert all(x["image"].shape == (8, 32, 32, 3) for x in a)
    assert len(set(ids[paths != ""])) == 2  # the bad examples keep their own ids
    for name in ("im2b.png", "zz.jpg"):  # logged once each, with the path
        assert sum(name in m for m in messages) == 1

    with pytest.raises(BadImage, match="cannot decode image"):
        take(pipeline.train_dataset(folder_config(folder_with_bad, batch=8,
                                                  bad_images="error")), 4)


def test_evaluation_leaves_unreadable_images_out_and_counts_them(folder_with_bad):
    batches = list(pipeline.eval_dataset(folder_config(folder_with_bad, batch=2)))
    unreadable = np.concatenate([b["unreadable"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert unreadable.sum() == 1 and mask.sum() == 3 and not np.any(mask & unreadable)
    with pytest.raises(BadImage, match="v1b.png"):
        list(pipeline.eval_dataset(folder_config(folder_with_bad, batch=2, bad_images="error")))


def test_bad_image_log_lists_counts_and_limits(tmp_path):
    log = bad_images.BadImageLog(tmp_path / "bad_images.txt", split_size=1000,
                                 max_fraction=0.003)
    log.add(np.array(["", "/d/a.jpg", "", "/d/b.jpg"]))
    log.add(np.array(["/d/a.jpg", ""]))  # seen again: listed and counted once
    assert log.flush() == 2
    log.add(np.array(["/d/c.jpg"]))
    assert log.flush() == 3
    assert (tmp_path / "bad_images.txt").read_text().split() == ["/d/a.jpg", "/d/b.jpg",
                                                                 "/d/c.jpg"]
    log.add(np.array(["/d/d.jpg"]))
    with pytest.raises(TooManyBadImages,
                       match=r"^4 of the 1000 training images cannot be read, more than "
                       r"data.max_bad_fraction=0.003; first: /d/a.jpg, /d/b.jpg, /d/c.jpg"):
        log.flush()


class TaskWithBadImages(SyntheticLatentTask):
    """The synthetic DiT task whose batches say that ids 3 and 7 replaced unreadable files."""

    def train_data(self, process_index, process_count):
        batches = super().train_data(process_index, process_count)

        def label(example):
            ids = example["id"]
            return dict(example, bad_path=np.where((ids == 3) | (ids == 7),
                                                   np.char.add("/data/", ids.astype(str)), ""))
        return batches.map(label)

    def bad_image_log(self, workdir, process_index, process_count):
        return bad_images.BadImageLog(workdir / "bad_images.txt", 24, 0.1)


@pytest.mark.slow
def test_the_trainer_records_replaced_images(tmp_path):
    cfg = ldm_train_config()
    cfg.update(total_steps=6, log_every=3)
    trainer.train_and_evaluate(cfg, str(tmp_path), TaskWithBadImages(cfg), mesh_of(1, 1))
    listed = (tmp_path / "bad_images.txt").read_text().split()
    assert sorted(listed) == ["/data/3", "/data/7"]


def test_a_tfds_record_that_cannot_be_decoded_is_a_bad_image():
    class Records:  # what tfds.data_source returns: random access that decodes on read
        def __len__(self):
            return 2

        def __getitem__(self, i):
            if i == 1:
                raise RuntimeError("Invalid JPEG data or crop window\nmore detail")
            if i >= 2:
                raise IndexError(i)
            return {"image": np.zeros((5, 6, 1), np.uint8), "label": 3}

    source = sources.TfdsSource(Records(), "imagenet2012", "train")
    assert source[0]["image"].shape == (5, 6, 3) and source[0]["label"] == 3
    with pytest.raises(BadImage, match=r"^cannot decode image 'tfds:imagenet2012/train\[1\]': "
                       r"RuntimeError: Invalid JPEG data or crop window$"):
        source[1]
    with pytest.raises(IndexError):
        source[2]
    skipping = bad_images.SkipBadImages(source)
    assert skipping[1]["bad_path"] == "tfds:imagenet2012/train[1]"
    assert skipping[0]["bad_path"] == ""
