"""Data pipeline: sources, train/eval streams, per-process slices, resumption. Never downloads."""

import ast
import itertools
import pathlib
import time

import numpy as np
import pytest
from PIL import Image
from absl import flags

from dgae_jax.data import pipeline, sources

from helpers import data_config, folder_config, take, write_image

DATA_DIR = pathlib.Path(pipeline.__file__).parent


def same_batches(a, b):
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
               for x, y in zip(a, b, strict=True))


@pytest.fixture
def folder(tmp_path):
    """data/train: 3 classes x 4 images (png/JPG/webp, assorted sizes); data/val: 5 images."""
    root = tmp_path / "data"
    exts = [".png", ".JPG", ".webp", ".jpeg"]
    for c, cls in enumerate(["cat", "dog", "eel"]):
        for k in range(4):
            write_image(root / "train" / cls / f"im{k}{exts[k]}", 36 + 5 * k, 48 - 3 * c,
                        10 * c + k)
    for k in range(5):
        write_image(root / "val" / ("a" if k < 2 else "b") / f"v{k}.png", 40, 60, 100 + k)
    return root


# --------------------------------------------------------------------------- train stream

def test_embedded_batches_shapes_dtypes_labels():
    batches = take(pipeline.train_dataset(data_config(batch=4)), 2)
    train = sources.EmbeddedPhotos("train")
    for b in batches:
        assert set(b) == {"image", "label", "id", "bad_path"} and not any(b["bad_path"])
        assert b["image"].dtype == np.uint8 and b["image"].shape == (4, 32, 32, 3)
        assert b["label"].dtype == np.int32 and b["label"].shape == (4,)
        assert b["id"].dtype == np.int64 and b["id"].shape == (4,)
        assert np.all((0 <= b["id"]) & (b["id"] < len(train)))
        assert [train.labels[i] for i in b["id"]] == b["label"].tolist()
        assert b["image"].std() > 5  # real photo content, not a blank


def test_embedded_split_is_disjoint_and_offline():
    train, held = sources.EmbeddedPhotos("train"), sources.EmbeddedPhotos("eval")
    assert set(train.names).isdisjoint(held.names)
    assert sorted(train.names + held.names) == sorted(sources.EmbeddedPhotos.PHOTOS)
    assert held.names == sources.EmbeddedPhotos.EVAL_PHOTOS
    for ex in itertools.chain(train, held):
        assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3
        assert ex["image"].shape[2] == 3 and min(ex["image"].shape[:2]) >= 172


def test_each_id_once_per_epoch_and_reshuffled(folder):
    it = iter(pipeline.train_dataset(folder_config(folder, batch=4)))
    epochs = [np.concatenate([next(it)["id"] for _ in range(3)]) for _ in range(3)]
    for ids in epochs:
        assert sorted(ids.tolist()) == list(range(12))
    assert len({tuple(e) for e in epochs}) == 3  # a new order every epoch


def test_process_slices_are_disjoint_and_cover_split(folder):
    cfg = folder_config(folder, batch=4)
    per_process = []
    for p in range(2):
        batches = take(pipeline.train_dataset(cfg, process_index=p, process_count=2), 3)
        assert all(b["image"].shape[0] == 2 for b in batches)
        ids = np.concatenate([b["id"] for b in batches]).tolist()
        assert sorted(ids) == list(range(p, 12, 2))  # slice p::2 of the source, each once
        per_process.append(set(ids))
    assert per_process[0].isdisjoint(per_process[1])
    assert per_process[0] | per_process[1] == set(range(12))


def test_batch_size_must_divide_over_processes():
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.train_dataset(data_config(batch=5), process_index=0, process_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.eval_dataset(data_config(batch=5), process_index=0, process_count=2)


def test_deterministic_given_seed():
    a = take(pipeline.train_dataset(data_config(seed=3)), 3)
    b = take(pipeline.train_dataset(data_config(seed=3)), 3)
    c = take(pipeline.train_dataset(data_config(seed=4)), 3)
    assert same_batches(a, b)
    assert not np.array_equal(np.stack([x["image"] for x in a]), np.stack([x["image"] for x in c]))


@pytest.mark.parametrize("crop", ["resize_random", "random_resized"])
def test_crops_vary_across_epochs(crop):
    # 15 train photos, batch 5: each 3 batches are one epoch.
    it = iter(pipeline.train_dataset(data_config(batch=5, crop=crop, flip=False)))
    views = {i: set() for i in range(15)}
    for _ in range(4):
        epoch = [next(it) for _ in range(3)]
        assert sorted(np.concatenate([b["id"] for b in epoch]).tolist()) == list(range(15))
        for b in epoch:
            for i, img in zip(b["id"].tolist(), b["image"]):
                views[i].add(img.tobytes())
    for i, ex in enumerate(sources.EmbeddedPhotos("train")):
        h, w = ex["image"].shape[:2]
        # resize_random only slides along the longer side: no freedom when it resizes to 32 too.
        if crop == "random_resized" or round(max(h, w) * 32 / min(h, w)) > 32:
            assert len(views[i]) >= 2, sources.EmbeddedPhotos("train").names[i]


def test_flip_is_the_only_change_on_exact_size_squares(tmp_path):
    for k in range(4):
        write_image(tmp_path / "train" / f"{k}.png", 16, 16, k)
    src = sources.ImageFolder(tmp_path / "train")
    for flip in (True, False):
        cfg = data_config("folder", size=16, batch=4, dir=str(tmp_path), flip=flip)
        it = iter(pipeline.train_dataset(cfg))
        flipped = []
        for b in (next(it) for _ in range(8)):
            for i, img in zip(b["id"], b["image"]):
                orig = src[i]["image"]
                assert np.array_equal(img, orig) or np.array_equal(img, orig[:, ::-1])
                flipped.append(not np.array_equal(img, orig))
        assert (0 < sum(flipped) < len(flipped)) if flip else not any(flipped)


def test_random_resized_box_area_is_uniform():
    rng = np.random.default_rng(0)
    boxes = np.array([pipeline.random_resized_box(300, 400, 0.25, rng) for _ in range(4000)])
    side = (boxes[:, 2] - boxes[:, 0]) / 300
    assert np.allclose(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert side.min() >= 0.25 and side.max() <= 1
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= 400 and boxes[:, 3].max() <= 300
    area = side ** 2  # uniform on [1/16, 1]: mean 0.53125, quartiles evenly spaced
    assert abs(area.mean() - 0.53125) < 0.02
    assert np.allclose(np.quantile(area, [0.25, 0.5, 0.75]), [0.296875, 0.53125, 0.765625],
                       atol=0.03)


def test_square_box_is_shorter_side_resize_then_crop():
    # 40x60 -> 20x30; centre crop columns 5..25 -> original columns 10..50.
    assert pipeline.square_box(40, 60, 20) == (10.0, 0.0, 50.0, 40.0)
    assert pipeline.square_box(40, 60, 20, offset=(0.0, 1.0)) == (20.0, 0.0, 60.0, 40.0)


# --------------------------------------------------------------------------- checkpointing

@pytest.mark.parametrize("prefetch", [0, 2])
def test_iterator_state_resumes_exactly(prefetch):
    ds = pipeline.train_dataset(data_config(batch=4, prefetch=prefetch))
    it = iter(ds)
    take(ds, 3, it)
    state = it.get_state()
    expected = take(ds, 4, it)
    resumed = iter(pipeline.train_dataset(data_config(batch=4, prefetch=prefetch)))
    resumed.set_state(state)
    assert same_batches(take(ds, 4, resumed), expected)


def test_worker_processes_give_the_same_stream_and_resume():
    cfg = data_config(size=16, batch=4)
    expected = take(pipeline.train_dataset(cfg), 5)
    cfg.data.workers = 1
    if not flags.FLAGS.is_parsed():  # as absl.app.run leaves them; grain's workers read them
        flags.FLAGS.mark_as_parsed()
    ds = pipeline.train_dataset(cfg)
    it = iter(ds)
    first = take(ds, 2, it)
    state = it.get_state()
    rest = take(ds, 3, it)
    it.close()
    assert same_batches(first + rest, expected)
    it2 = iter(ds)
    it2.set_state(state)
    assert same_batches(take(ds, 3, it2), rest)
    it2.close()


# --------------------------------------------------------------------------- eval stream

def eval_ids(cfg, processes):
    """Real ids per process, padding checked to be masked."""
    out = []
    for p in range(processes):
        ids = []
        for b in pipeline.eval_dataset(cfg, process_index=p, process_count=processes):
            assert b["image"].shape == (cfg.batch_size // processes, cfg.image_size,
                                        cfg.image_size, 3)
            assert b["mask"].dtype == np.bool_
            assert np.all(b["id"][~b["mask"]] == -1) and np.all(b["image"][~b["mask"]] == 0)
            ids += b["id"][b["mask"]].tolist()
        out.append(ids)
    return out


def test_eval_uses_each_example_once_across_processes(folder):
    cfg = folder_config(folder, batch=4)  # 5 eval images -> padded to 8, 2 batches of 2 each
    per_process = eval_ids(cfg, 2)
    assert sorted(per_process[0] + per_process[1]) == list(range(5))
    assert [len(ids) for ids in per_process] == [3, 2]
    assert sorted(eval_ids(cfg, 1)[0]) == list(range(5))


def test_eval_is_deterministic_and_centre_cropped(folder):
    cfg = folder_config(folder, batch=4)
    a, b = list(pipeline.eval_dataset(cfg)), list(pipeline.eval_dataset(cfg))
    assert same_batches(a, b)
    src = sources.ImageFolder(folder / "val")
    first = src[0]["image"]  # 40x60: the shorter side is resized to 32, the centre kept
    expected = sources.crop_resize(first, pipeline.square_box(40, 60, 32), 32)
    assert np.array_equal(a[0]["image"][0], expected)
    assert a[0]["label"].tolist()[:2] == [0, 0] and a[1]["label"][0] == 1


def test_eval_size_takes_the_first_examples(folder):
    cfg = folder_config(folder, batch=4, eval_size=3)
    assert sorted(sum(eval_ids(cfg, 2), [])) == [0, 1, 2]
    cfg.data.eval_size = 6
    with pytest.raises(ValueError, match="eval_size"):
        pipeline.eval_dataset(cfg)


def test_embedded_eval_is_fixed_crops_of_held_out_photos():
    cfg = data_config(batch=8)
    a = list(pipeline.eval_dataset(cfg))
    assert same_batches(a, list(pipeline.eval_dataset(data_config(batch=8, seed=9))))
    images = np.concatenate([b["image"] for b in a])
    assert len(images) == 32 and all(b["mask"].all() for b in a)
    assert sorted(np.concatenate([b["id"] for b in a]).tolist()) == list(range(32))
    held = sources.EmbeddedPhotos("eval").labels
    labels = np.concatenate([b["label"] for b in a]).tolist()
    assert labels == [lab for _ in range(8) for lab in held]  # photos interleaved
    assert len({img.tobytes() for img in images}) == 32  # 32 distinct views


def test_embedded_eval_crops_and_their_seed():
    """data.eval_crops sets the crops per held-out photo; data.eval_crop_seed moves them (other
    crops of the same photos, at the same scales)."""
    cfg = data_config(batch=8)
    cfg.data.eval_crops = 4
    base = sources.make_source(cfg, "eval")
    assert len(base) == 16 and base.per_image == 4
    cfg.data.eval_crop_seed = 1
    moved = sources.make_source(cfg, "eval")
    first, other = base[5], moved[5]
    assert first["label"] == other["label"] and first["image"].shape == other["image"].shape
    assert not np.array_equal(first["image"], other["image"])
    photo = sources.load_photo(sources.EmbeddedPhotos("eval").names[1]).shape[:2]
    box, moved_box = base.box(5, *photo), moved.box(5, *photo)
    assert box[2] - box[0] == pytest.approx(moved_box[2] - moved_box[0])  # same scale


# --------------------------------------------------------------------------- folder source

def test_folder_labels_follow_sorted_subfolders(folder):
    src = sources.ImageFolder(folder / "train")
    assert src.classes == ("cat", "dog", "eel") and len(src) == 12
    for path, label in zip(src.paths, src.labels):
        assert pathlib.Path(path).relative_to(folder / "train").parts[0] == src.classes[label]
    assert src[5]["image"].dtype == np.uint8 and src[5]["image"].shape[2] == 3
    assert {pathlib.Path(p).suffix for p in src.paths} == {".png", ".JPG", ".webp", ".jpeg"}


def test_folder_flat_grayscale_and_rgba(tmp_path):
    Image.fromarray(np.full((20, 30), 7, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((20, 30, 4), 9, np.uint8)).save(tmp_path / "h.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    src = sources.ImageFolder(tmp_path)
    assert src.labels == (0, 0)
    assert src[0]["image"].shape == (20, 30, 3) and np.all(src[0]["image"] == 7)
    # RGBA(9, 9, 9, alpha 9) over white: 9 * 9 / 255 + 255 * (1 - 9 / 255) = 246.3
    assert src[1]["image"].shape == (20, 30, 3) and np.all(src[1]["image"] == 246)


def test_folder_unreadable_file_is_named(folder):
    bad = folder / "train" / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    src = sources.ImageFolder(folder / "train")
    with pytest.raises(ValueError, match="broken.png"):
        src[src.paths.index(str(bad))]
    it = iter(pipeline.train_dataset(folder_config(folder, batch=13, bad_images="error")))
    with pytest.raises(Exception, match="broken.png"):
        next(it)


def test_folder_empty_or_missing_is_an_error(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        sources.ImageFolder(tmp_path / "empty")
    with pytest.raises(ValueError, match="missing"):
        sources.ImageFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="data.dir"):
        pipeline.train_dataset(data_config("folder", dir=""))


# --------------------------------------------------------------------------- tfds and dispatch

@pytest.mark.parametrize("name", ["imagenet2012", "no_such_dataset_xyz"])
def test_tfds_missing_dataset_fails_fast_without_download(tmp_path, name):
    cfg = data_config(f"tfds:{name}", dir=str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ValueError, match=name) as err:
        pipeline.train_dataset(cfg)
    assert time.monotonic() - start < 20
    assert "\n" not in str(err.value)
    if name == "imagenet2012":
        assert "tfds build imagenet2012 --file_format=array_record" in str(err.value)
        assert str(tmp_path) in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing was fetched or written


def test_unknown_data_name():
    for name in ["imagenet", "tfds:", "embeded"]:
        with pytest.raises(ValueError, match="data.name"):
            sources.make_source(data_config(name), "train")


def test_tfds_path_end_to_end_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        cfg = data_config("tfds:mnist", size=16, batch=2, dir=str(tmp_path), eval_split="test")
        b = take(pipeline.train_dataset(cfg), 3)[-1]  # mnist is 28x28x1 -> RGB
        assert b["image"].shape == (2, 16, 16, 3) and b["image"].dtype == np.uint8
        ids = sum(eval_ids(cfg, 2), [])
    assert sorted(ids) == list(range(6))


def test_data_modules_do_not_import_jax():
    for path in DATA_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("jax", "flax") for n in names), path
