"""grain train/eval streams of numpy batches {"image": uint8 BxHxWx3, "label": int32, "id": int64}
(plus `bad_path` in training and `mask`, `unreadable` in evaluation; data/bad_images.py).

`id` is the example's index in the whole (unsliced) split, so tests and the trainer can prove that
no example is lost or seen twice. Images stay uint8 here; the trainer maps them to [-1, 1] on
device. Grain semantics this relies on (checked on grain 0.2.18):
  * MapDataset ops receive the raw index, epoch offset included (`repeat` does not wrap it), so
    `shuffle(seed).repeat()` draws a new permutation every epoch with exact epoch boundaries
    (`repeat().shuffle()` would mix epochs), and `random_map` draws new augmentations each epoch.
  * `random_map(fn, seed)` gives fn a numpy Generator that is a function of (seed, index) only,
    so the stream is deterministic and a restored iterator replays it exactly.
  * An iterator's `get_state()` / `set_state()` resume exactly, with threads or with
    `mp_prefetch` workers.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from dgae_jax.data import bad_images, sources
from dgae_jax.errors import BadImage, ConfigError

CROPS = ("resize_random", "random_resized")


# --------------------------------------------------------------------------- per-example ops

def square_box(height: int, width: int, size: int, offset=None):
    """Box of the size x size crop of the image resized so its shorter side is `size`.

    `offset` = (dy, dx) in [0, 1] places the crop along the free axis (0.5, 0.5 = centre). The
    box is in original pixels so crop_resize can filter from the full-resolution image.
    """
    scale = min(height, width) / size
    new_h, new_w = max(size, round(height / scale)), max(size, round(width / scale))
    dy, dx = (0.5, 0.5) if offset is None else offset
    top, left = round(dy * (new_h - size)), round(dx * (new_w - size))
    return (left * scale, top * scale, (left + size) * scale, (top + size) * scale)


def random_resized_box(height: int, width: int, min_scale: float, rng: np.random.Generator):
    """A random square whose area fraction of the shorter side's square is U[min_scale^2, 1]."""
    side = np.sqrt(rng.uniform(min_scale ** 2, 1.0)) * min(height, width)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    return (x0, y0, x0 + side, y0 + side)


def augment(example: dict, rng: np.random.Generator, *, size: int, crop: str,
            min_scale: float, flip: bool) -> dict:
    """Training view: the configured random crop resized to `size`, then maybe a flip."""
    image = example["image"]
    h, w = image.shape[:2]
    if crop == "resize_random":
        box = square_box(h, w, size, offset=(rng.uniform(), rng.uniform()))
    else:
        box = random_resized_box(h, w, min_scale, rng)
    image = sources.crop_resize(image, box, size)
    if flip and rng.uniform() < 0.5:
        image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image, dtype=np.uint8), "label": example["label"],
            "id": example["id"], "bad_path": example["bad_path"]}


def with_id(index: int, example: dict, *, length: int) -> dict:
    """Attach the example's index in the full source (grain passes epoch-offset indices) and
    the path of the unreadable image it replaces ('' if none; data/bad_images.py)."""
    return {"image": example["image"], "label": np.int32(example["label"]),
            "id": np.int64(index % length), "bad_path": example.get("bad_path", "")}


def eval_example(index: int, *, source, count: int, size: int, skip_bad: bool = True) -> dict:
    """Eval view of example `index` (shorter side resized, centre crop), or masked padding; an
    unreadable image is masked out and flagged `unreadable` (with skip_bad), else an error."""
    try:
        example = source[index] if index < count else None
    except BadImage:
        if not skip_bad:
            raise
        example = None
    if example is None:  # padding (id -1), or an unreadable image (its own id)
        return {"image": np.zeros((size, size, 3), np.uint8), "label": np.int32(0),
                "id": np.int64(index if index < count else -1), "mask": np.bool_(False),
                "unreadable": np.bool_(index < count)}
    image = example["image"]
    image = sources.crop_resize(image, square_box(*image.shape[:2], size), size)
    return {"image": np.ascontiguousarray(image, dtype=np.uint8),
            "label": np.int32(example["label"]), "id": np.int64(index), "mask": np.bool_(True),
            "unreadable": np.bool_(False)}


# --------------------------------------------------------------------------- datasets

def per_process_batch(config, process_count: int) -> int:
    """The per-process batch; the global `batch_size` must split evenly over processes."""
    if config.batch_size % process_count:
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by "
                         f"process_count={process_count}")
    return config.batch_size // process_count


def stream_seed(seed: int, process_index: int, salt: int) -> int:
    """Independent 32-bit seeds per (config.seed, process, use) for grain ops."""
    return int(np.random.SeedSequence([seed, process_index, salt]).generate_state(1)[0])


def _to_iter(ds: grain.MapDataset, data) -> grain.IterDataset:
    """Prefetch with threads (workers=0) or with `data.workers` processes."""
    prefetch = max(0, int(data.prefetch))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
    if data.workers > 0:
        from absl import flags

        # grain's workers read absl flags, so they must be parsed (the CLI's app.run does it).
        if not flags.FLAGS.is_parsed():
            raise ConfigError(f"data.workers={data.workers} starts grain worker processes, which "
                              "read absl flags: parse them first (absl.app.run, or "
                              "absl.flags.FLAGS.mark_as_parsed() in a notebook)")
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(data.workers), per_worker_buffer_size=max(1, prefetch)))
    return it


def train_dataset(config, process_index: int = 0, process_count: int = 1,
                  source=None) -> grain.IterDataset:
    """Infinite, per-epoch reshuffled, augmented batches of this process's slice of the split.

    Slicing before shuffling gives each process a fixed disjoint share (index p::P), so an
    epoch of all processes covers the split exactly once; the order and the augmentations are
    a function of config.seed only, so an iterator restored with set_state replays the stream.
    `source` (default: the config's train source) lets a caller keep the source it built.
    """
    data = config.data
    source = sources.make_source(config, "train") if source is None else source
    if data.bad_images == "skip":
        source = bad_images.SkipBadImages(source)
    ds = grain.MapDataset.source(source).map_with_index(
        functools.partial(with_id, length=len(source)))
    return epoch_batches(ds, config, process_index, process_count, functools.partial(
        augment, size=config.image_size, crop=data.crop, min_scale=data.min_scale,
        flip=data.flip))


def epoch_batches(ds: grain.MapDataset, config, process_index: int, process_count: int,
                  random_op) -> grain.IterDataset:
    """This process's slice of `ds`, reshuffled every epoch, `random_op(example, rng)` applied
    after the repeat (so every epoch draws anew), in batches of batch_size / process_count."""
    batch = per_process_batch(config, process_count)
    size = len(ds)
    ds = ds[process_index::process_count]
    if len(ds) == 0:
        raise ConfigError(f"process {process_index} of {process_count} gets no training "
                         f"examples: the train split has only {size}")
    ds = ds.shuffle(seed=stream_seed(config.seed, process_index, 0)).repeat()
    ds = ds.random_map(random_op, seed=stream_seed(config.seed, process_index, 1))
    return _to_iter(ds.batch(batch, drop_remainder=True), config.data)


def eval_size(config, source) -> int:
    """How many eval examples to use: data.eval_size, or the whole split when it is 0."""
    n = config.data.eval_size
    if n < 0 or n > len(source):
        raise ConfigError(f"data.eval_size={n} is outside [0, {len(source)}] (the eval split "
                         "size; 0 means all of it)")
    return n or len(source)


def eval_dataset(config, process_index: int = 0, process_count: int = 1,
                 source=None) -> grain.IterDataset:
    """One deterministic pass over the first eval_size eval examples, split over processes
    (or over every example of `source`, in the same eval view).

    The example list is padded to a multiple of the global batch, so every process runs the
    same number of batches (collectives stay in step) and each process gets whole batches; the
    padded entries have mask False, id -1 and a black image, and metrics must weight by `mask`.
    Process p takes the p-th of the P equal slices of every global batch, so every real example
    is used exactly once and the global batches (process slices in process order, as the mesh
    lays them out) are those of one process: per-row noise and the image grid do not depend on P.
    For data.name='embedded' the eval split is FixedCrops: 8 fixed crops of each of the 4
    held-out photos (32 images), see sources.FixedCrops.
    """
    batch = per_process_batch(config, process_count)
    if source is None:
        source = sources.make_source(config, "eval")
        count = eval_size(config, source)
    else:
        count = len(source)
    total = -(-count // config.batch_size) * config.batch_size
    ids = np.arange(total).reshape(-1, process_count, batch)[:, process_index].ravel()
    ds = grain.MapDataset.source(ids.tolist())
    ds = ds.map(functools.partial(eval_example, source=source, count=count,
                                  size=config.image_size,
                                  skip_bad=config.data.bad_images == "skip"))
    return _to_iter(ds.batch(batch, drop_remainder=True), config.data)
