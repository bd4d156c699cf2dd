"""`python -m dgae_jax.fid A [B] [--save_stats=OUT.npz]`: FID, sFID, precision and recall.

A and B are each one of
    DIR                 a folder of images (recursive; .jpg/.jpeg/.png/.webp)
    FILE.npz            uint8 images (N, H, W, 3) under the key 'arr_0' (ADM's sample files,
                        and `--mode=sample` output) or 'images'
    FILE.npz            statistics: keys mu, sigma (+ mu_s, sigma_s for sFID, + count, count_s),
                        as --save_stats writes them and as ADM's evaluator reads them; the older
                        spatial_* keys also load
    FILE.npz            statistics AND uint8 images under 'arr_0': an ADM reference batch such as
                        VIRTUAL_imagenet256_labeled.npz (statistics of the whole dataset, 10,000
                        images); its statistics give FID / sFID, its images only precision/recall
    tfds:NAME[:SPLIT]   a prepared TFDS dataset (split 'validation' by default)
A is the reference. Images are embedded with the FID Inception (see models/inception.py), sharded
over all devices, a batch at a time. Images of one set must share a size, unless --image_size=N
is given: then each is resized (shorter side to N) and centre-cropped to NxN first, the eval
view of the training pipeline. When both inputs have images, precision/recall (k=3) of B against
A are computed too (a statistics file's images are embedded for that and nothing else);
--noprecision_recall skips them, and with them the embedding of a reference batch's images.
The last line printed is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
from concurrent import futures

import jax
import ml_collections
import numpy as np
from absl import app, flags

from dgae_jax import parallel, progress
from dgae_jax.data import pipeline, sources
from dgae_jax.metrics import frechet, inception_convert
from dgae_jax.metrics.features import FeatureCollector, InceptionFeatures

_SAVE_STATS = flags.DEFINE_string("save_stats", None, "Write the statistics of A to this .npz.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Global batch of images per Inception call.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "If > 0, resize the shorter side to N and centre-crop NxN first.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Use only the first N images of each set (0: all).")
_PRECISION_RECALL = flags.DEFINE_boolean(
    "precision_recall", True, "Compute precision/recall when both inputs have images "
    "(--noprecision_recall: FID / sFID only, no embedding of a statistics file's images).")
_WEIGHTS = flags.DEFINE_string("inception_weights", None,
                               "Converted Inception .npz (default: models/inception.py).")


# ----------------------------------------------------------------------------- image sets
class NpzImages:
    """uint8 (N, H, W, 3) images inside an .npz, read in row ranges without loading them all."""

    KEYS = ("arr_0", "images")

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key
        self._zip = zipfile.ZipFile(path)
        self._file = self._zip.open(f"{key}.npy")
        version = np.lib.format.read_magic(self._file)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(self._file)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            raise ValueError(f"{path}: {key!r} must be a C-order uint8 (N, H, W, 3) array, got "
                             f"{dtype} {shape}")
        self._offset = self._file.tell()
        self.count, self.image_shape = shape[0], tuple(shape[1:])

    def __len__(self) -> int:
        return self.count

    def read(self, start: int, stop: int) -> np.ndarray:
        row = math.prod(self.image_shape)
        self._file.seek(self._offset + start * row)
        data = self._file.read((stop - start) * row)
        return np.frombuffer(data, np.uint8).reshape(stop - start, *self.image_shape)


class SourceImages:
    """Images of a random-access source (image files, TFDS), decoded with threads."""

    def __init__(self, source, size: int, name: str):
        self.source, self.size, self.name = source, size, name
        self._pool = futures.ThreadPoolExecutor(max(4, os.cpu_count() or 1))
        self.image_shape = None
        self.image_shape = self._load(0).shape

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, i: int) -> np.ndarray:
        image = self.source[i]["image"]
        if self.size:
            image = sources.crop_resize(image, pipeline.square_box(*image.shape[:2], self.size),
                                        self.size)
        if self.image_shape is not None and image.shape != self.image_shape:
            raise ValueError(f"{self.name}: image {i} is {image.shape[:2]} but image 0 is "
                             f"{self.image_shape[:2]}; pass --image_size=N to centre-crop all")
        return image

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.stack(list(self._pool.map(self._load, range(start, stop))))


class Limited:
    """The first `limit` images of a set."""

    def __init__(self, images, limit: int):
        self.images, self.image_shape = images, images.image_shape
        self.count = min(limit, len(images))

    def __len__(self) -> int:
        return self.count

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.images.read(start, stop)


@dataclasses.dataclass
class Input:
    """One side of the comparison: precomputed statistics, images, or both (an ADM reference
    batch). With statistics, they give FID / sFID and the images serve precision/recall only."""

    spec: str
    stats: dict[str, frechet.FeatureStats] | None = None
    images: object = None  # NpzImages / SourceImages / Limited, or None

    @property
    def kind(self) -> str:
        return "stats" if self.stats is not None else "images"


def open_input(spec: str, image_size: int = 0) -> Input:
    """An input spec (see the module doc) opened: statistics loaded, image sets ready to read."""
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition(":")
        if not image_size:
            raise ValueError(f"{spec}: TFDS images differ in size; pass --image_size=N")
        return Input(spec, images=SourceImages(sources.tfds_source(name, split or "validation"),
                                               image_size, spec))
    if os.path.isdir(spec):
        return Input(spec, images=SourceImages(sources.ImageFolder(spec), image_size, spec))
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"{spec}: no such folder or file")
    if not spec.endswith(".npz"):
        raise ValueError(f"{spec}: expected a folder, an .npz or tfds:NAME[:SPLIT]")
    with np.load(spec) as data:
        files = set(data.files)
    stats = frechet.load_stats(spec) if {"mu", "sigma"} <= files else None
    # A statistics file's images: ADM's reference batches keep them under 'arr_0' only.
    keys = ("arr_0",) if stats is not None else NpzImages.KEYS
    key = next((k for k in keys if k in files), None)
    if stats is None and key is None:
        raise ValueError(f"{spec}: neither statistics (mu, sigma) nor images "
                         f"({' or '.join(NpzImages.KEYS)}); it holds {sorted(files)}")
    if image_size and stats is None:  # (a reference batch's images are used as they are)
        raise ValueError(f"{spec}: --image_size applies to folders and TFDS, not to .npz arrays")
    return Input(spec, stats, NpzImages(spec, key) if key is not None else None)


# ----------------------------------------------------------------------------- embedding
def process_range(count: int, process: int) -> tuple[int, int]:
    """A process's contiguous share of `count` images."""
    n = jax.process_count()
    return process * count // n, (process + 1) * count // n


def embed(images, extractor: InceptionFeatures, batch_size: int) -> FeatureCollector:
    """Features of every image of the set, each exactly once, over all processes.

    Every process runs the same number of batches (short shares are padded, mask False); the
    next batch is read while the devices embed the current one.
    """
    mesh = extractor.mesh
    if batch_size % mesh.size or batch_size % jax.process_count():
        raise ValueError(f"--batch_size={batch_size} must be divisible by the {mesh.size} "
                         f"devices and {jax.process_count()} processes")
    local = batch_size // jax.process_count()
    start, stop = process_range(len(images), jax.process_index())
    largest = max(b - a for a, b in (process_range(len(images), p)
                                     for p in range(jax.process_count())))
    steps = -(-largest // local)
    collector, pending = FeatureCollector(), None
    meter = progress.bar(stop - start, "inception features")
    for i in range(steps):
        lo, hi = min(start + i * local, stop), min(start + (i + 1) * local, stop)
        chunk = np.zeros((local, *images.image_shape), np.uint8)
        chunk[:hi - lo] = images.read(lo, hi) if hi > lo else chunk[:0]
        mask = np.arange(local) < hi - lo
        batch = parallel.global_batch({"image": chunk, "mask": mask}, mesh)
        features = extractor(batch["image"])
        if pending is not None:
            collector.add(*pending)
        pending = (features, batch["mask"])
        meter.update(hi - lo)
    if pending is not None:
        collector.add(*pending)
    meter.close()
    return collector


def describe(item: Input, embedded: bool) -> dict:
    """The input's record in the result. `count`: images embedded for its statistics, or the
    count stored in its statistics file (null when the file has none, as in ADM's)."""
    out = {"input": item.spec}
    if item.stats is not None:
        out["count"] = item.stats["pool"].count
        out["statistics"] = sorted(item.stats)
        if embedded:  # its images, embedded for precision/recall only
            out["pr_images"] = len(item.images)
    else:
        out["count"] = len(item.images)
    if embedded:
        out["image_shape"] = list(item.images.image_shape)
    return out


def evaluate(spec_a: str, spec_b: str | None = None, *, save_stats: str | None = None,
             batch_size: int = 64, image_size: int = 0, limit: int = 0,
             weights: str | None = None, precision_recall: bool = True) -> dict:
    """The CLI's work, importable: statistics of A (saved if asked) and, given B, the scores.

    Precision/recall are computed when `precision_recall` and both inputs have images; only
    then are a statistics file's images embedded. `limit` applies to images, not to statistics.
    """
    inputs = [open_input(s, image_size) for s in (spec_a, spec_b) if s is not None]
    if save_stats and inputs[0].stats is not None:
        raise ValueError(f"--save_stats needs an image set for A, but {spec_a} holds statistics")
    pr = precision_recall and len(inputs) == 2 and all(i.images is not None for i in inputs)
    for item in inputs:
        if item.images is not None and limit:
            item.images = Limited(item.images, limit)
    # Embed an input's images when they give its statistics, or when precision/recall needs them.
    embedded = [item.stats is None or pr for item in inputs]
    extractor = None
    if any(embedded):
        mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
        extractor = InceptionFeatures(mesh, inception_convert.load_or_convert(weights))
    stats, pools = [], []
    for item, embed_it in zip(inputs, embedded):
        collected = embed(item.images, extractor, batch_size) if embed_it else None
        stats.append(item.stats if item.stats is not None else collected.stats())
        pools.append(collected.array("pool") if collected is not None and pr else None)
    result = {"a": describe(inputs[0], embedded[0])}
    if save_stats:
        if jax.process_index() == 0:
            frechet.save_stats(save_stats, stats[0])
        result["saved_stats"] = os.path.abspath(save_stats)
    if spec_b is not None:
        result["b"] = describe(inputs[1], embedded[1])
        result.update(frechet.compare(stats[0], stats[1], pools[0], pools[1]))
    return result


def main(argv) -> None:
    if len(argv) not in (2, 3):
        raise app.UsageError("usage: python -m dgae_jax.fid A [B] [--save_stats=OUT.npz]")
    parallel.initialize_distributed()
    if len(argv) == 2 and not _SAVE_STATS.value:
        raise app.UsageError("with one input, give --save_stats=OUT.npz")
    print(json.dumps(evaluate(argv[1], argv[2] if len(argv) == 3 else None,
                              save_stats=_SAVE_STATS.value, batch_size=_BATCH.value,
                              image_size=_IMAGE_SIZE.value, limit=_LIMIT.value,
                              weights=_WEIGHTS.value,
                              precision_recall=_PRECISION_RECALL.value)))


if __name__ == "__main__":
    app.run(main)
