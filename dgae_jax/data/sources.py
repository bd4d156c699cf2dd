"""Random-access image sources for grain: `len(src)` and `src[i] -> {"image", "label"}`.

Every source returns the full RGB image as uint8 (H, W, 3) and an int label; cropping and
resizing happen in pipeline.py. Nothing here imports jax or downloads anything: the data
workers stay light, and a dataset that is not on disk is an immediate error, never a download.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image

from dgae_jax.data.images import decode_image_file
from dgae_jax.errors import BadImage, ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def to_rgb(image) -> np.ndarray:
    """Any uint8 HxW, HxWx1, HxWx3 or HxWx4 array -> contiguous uint8 HxWx3 (alpha dropped)."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def crop_resize(image: np.ndarray, box, size: int) -> np.ndarray:
    """Crop `box` = (x0, y0, x1, y1) (float pixel edges) and resize it to size x size.

    One PIL call does both, filtering from the full-resolution pixels: bicubic with the kernel
    widened on downscaling, i.e. antialiased, and much cheaper than resizing the whole image.
    """
    h, w = image.shape[:2]
    if tuple(box) == (0, 0, w, h) and h == w == size:
        return image
    x0, y0, x1, y1 = (float(b) for b in box)
    box = (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))  # Float round-off.
    out = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out)


# --------------------------------------------------------------------------- embedded photos

def _load_skimage(name: str) -> np.ndarray:
    import skimage.data  # Local import: only the embedded source needs scikit-image.

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]  # The left view of the stereo pair.
    return getattr(skimage.data, name)()


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One bundled scikit-image photograph as read-only uint8 RGB (cached per process)."""
    image = to_rgb(_load_skimage(name))
    image.flags.writeable = False
    return image


class EmbeddedPhotos:
    """The real photographs bundled inside scikit-image (no download), as a tiny dataset.

    PHOTOS is every `skimage.data` image that loads offline and is a photograph (or a scan) of
    a real scene at least 172 px on its shorter side; grayscale ones are stacked to RGB. Left
    out: those fetched with pooch (brain, eagle, lily, ...: they fail offline), `cat` (the same
    picture as `chelsea`), binary/synthetic ones (binary_blobs, checkerboard, horse, logo,
    shepp_logan_phantom), and tiny ones (lfw_subset 25 px, microaneurysms 102 px).
    EVAL_PHOTOS (one gray portrait, one RGB still life, one astronomy image, one outdoor
    scene) are held out as split "eval"; the other 15 are split "train". The label of an
    example is the index of its photo in PHOTOS, so it names the source photo in both splits.
    """

    PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
              "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
              "moon", "motorcycle", "page", "retina", "rocket", "text")
    EVAL_PHOTOS = ("camera", "coffee", "hubble_deep_field", "rocket")

    def __init__(self, split: str = "train"):
        if split not in ("train", "eval"):
            raise ValueError(f"EmbeddedPhotos split must be 'train' or 'eval', got {split!r}")
        self.split = split
        self.names = self.split_names(split)
        self.labels = tuple(self.PHOTOS.index(n) for n in self.names)

    @classmethod
    def split_names(cls, split: str) -> tuple[str, ...]:
        """The sorted photo names of a split ('train' or 'eval')."""
        held_out = split == "eval"
        return tuple(n for n in cls.PHOTOS if (n in cls.EVAL_PHOTOS) == held_out)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        return {"image": load_photo(self.names[i]), "label": self.labels[i]}

    def __repr__(self) -> str:
        return f"EmbeddedPhotos({self.split!r}, {len(self)} photos)"


class FixedCrops:
    """`per_image` deterministic square crops of each image of `source`, resized to `size`.

    A handful of held-out photos is too few to evaluate on, so each one yields several fixed
    views at distinct scales: crop j of image k has side MAX_SCALE * (MIN_SCALE / MAX_SCALE) **
    (j / (per_image - 1)) of the shorter side (for 8 crops: 1.0, 0.84, 0.71, 0.60, 0.50, 0.42,
    0.36, 0.30), at a position drawn from a generator seeded with (seed, k, j). The boxes depend
    only on the image shape and the seed (not on the training seed), so the eval set is the same
    in every run. Example i is crop i // len(source) of image i % len(source): photos are
    interleaved, so any prefix of the set (the first batch shown in a grid, `data.eval_size`)
    covers every held-out photo. Labels are the source labels.
    """

    MAX_SCALE, MIN_SCALE = 1.0, 0.3

    def __init__(self, source, size: int, per_image: int = 8, seed: int = 0):
        self.source, self.size, self.per_image, self.seed = source, size, per_image, seed

    def __len__(self) -> int:
        return len(self.source) * self.per_image

    def box(self, i: int, height: int, width: int) -> tuple[float, float, float, float]:
        j, k = divmod(i, len(self.source))
        frac = j / (self.per_image - 1) if self.per_image > 1 else 0.0
        side = self.MAX_SCALE * (self.MIN_SCALE / self.MAX_SCALE) ** frac * min(height, width)
        rng = np.random.default_rng([self.seed, k, j])
        x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
        return (x0, y0, x0 + side, y0 + side)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"FixedCrops index {i} out of range [0, {len(self)})")
        example = self.source[i % len(self.source)]
        image = example["image"]
        box = self.box(i, *image.shape[:2])
        return {"image": crop_resize(image, box, self.size), "label": example["label"]}


# --------------------------------------------------------------------------- image folder

def find_images(root: str) -> list[str]:
    """Sorted relative paths of every image file under root (recursive, following symlinks;
    names starting with '.' skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(found)


class ImageFolder:
    """Images under `root` (recursive; .jpg/.jpeg/.png/.webp in any case), sorted by path.

    The label is the index of the image's top-level sub-folder among the sorted sub-folders
    that hold at least one image (torchvision's ImageFolder convention); images lying directly
    in `root` get label 0 when there are no sub-folders, and are an error when there are (they
    would have no class). Names starting with '.' are skipped. Images are decoded by
    images.decode_image_file (any mode to upright RGB; BadImage naming an unreadable file).
    """

    def __init__(self, root: str):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise ConfigError(f"image folder {self.root!r} does not exist or is not a directory")
        rel = find_images(self.root)
        if not rel:
            raise ConfigError(f"image folder {self.root!r} holds no {'/'.join(IMAGE_EXTENSIONS)} "
                             "images")
        tops = [p.split(os.sep, 1)[0] if os.sep in p else None for p in rel]
        self.classes = tuple(sorted({t for t in tops if t is not None}))
        if self.classes and None in tops:
            loose = rel[tops.index(None)]
            raise ConfigError(f"image folder {self.root!r} mixes images directly in it (e.g. "
                             f"{loose!r}) with class sub-folders {list(self.classes)}")
        index = {c: k for k, c in enumerate(self.classes)}
        self.paths = tuple(os.path.join(self.root, p) for p in rel)
        self.labels = tuple(index[t] if t is not None else 0 for t in tops)

    def __len__(self) -> int:
        return len(self.paths)

    def file_names(self) -> list[str]:
        return [os.path.basename(p) for p in self.paths]

    def __getitem__(self, i: int) -> dict:
        return {"image": decode_image_file(self.paths[i]), "label": self.labels[i]}

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, {len(self)} images, {len(self.classes)} classes)"


# --------------------------------------------------------------------------- tfds

class TfdsSource:
    """Wraps a tfds ArrayRecord data source: records -> {"image": RGB uint8, "label": int}.

    Datasets without a "label" feature get label 0; other features (file names, ids) are dropped.
    """

    def __init__(self, records, name: str, split: str, data_dir: str = ""):
        self.records, self.name, self.split, self.data_dir = records, name, split, data_dir

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        try:
            record = self.records[i]
            image = to_rgb(record["image"])
        except IndexError:
            raise
        except Exception as error:  # a record whose image TFDS cannot decode
            raise BadImage(f"tfds:{self.name}/{self.split}[{i}]",
                           f"{type(error).__name__}: {error}".splitlines()[0]) from error
        return {"image": image, "label": int(record.get("label", 0))}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples)"

    def file_names(self) -> list[str]:
        """Every record's `file_name` feature, read without decoding the images."""
        import tensorflow_datasets as tfds

        records = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir or None,
                                   download=False,
                                   decoders={"image": tfds.decode.SkipDecoding()})
        if "file_name" not in records[0]:
            raise ConfigError(f"tfds dataset {self.name!r} has no file_name feature, so "
                              "data.eval_subset cannot select from it")
        return [_text(records[i]["file_name"]) for i in range(len(records))]


def _tfds_root(data_dir: str) -> str:
    """The directory tfds reads when data_dir is empty (for error messages)."""
    default = os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    return data_dir or default


def tfds_source(name: str, split: str, data_dir: str = "") -> TfdsSource:
    """`tfds.data_source(..., download=False)`: a prepared array_record dataset, or a ValueError.

    tfds 4.9.10 with download=False fails fast on a missing dataset, but with a misleading
    NotImplementedError about the TFRECORD format; this turns it into a message that says how
    to prepare the dataset once. Never downloads (a download offline hangs for minutes).
    """
    import tensorflow_datasets as tfds  # Local import: only tfds sources pay for it.

    root = _tfds_root(data_dir)
    try:
        records = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ConfigError(f"tfds dataset {name!r} is not registered in tensorflow_datasets "
                         f"{tfds.__version__} (data.name='tfds:{name}')") from e
    except Exception as e:
        raise ConfigError(_tfds_failure(tfds, name, split, data_dir, root, e)) from e
    return TfdsSource(records, name, split, data_dir)


def _text(value) -> str:
    """A TFDS text feature (bytes, or a 0-d numpy array of bytes) as str."""
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- eval subsets

SUBSET_DIR = os.path.dirname(__file__)
NAMED_SUBSETS = {"imagenet_val_5k": os.path.join(SUBSET_DIR, "imagenet_val_5k.txt")}


def subset_names(subset: str) -> list[str]:
    """File names of a named subset (see NAMED_SUBSETS) or of a text file: one per line, '#'
    comments."""
    path = NAMED_SUBSETS.get(subset, subset)
    if not os.path.isfile(path):
        raise ConfigError(f"data.eval_subset={subset!r} is neither one of "
                          f"{sorted(NAMED_SUBSETS)} nor a file of file names")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.eval_subset file {path} lists a file name twice")
    return names


class Subset:
    """The examples of `source` whose file names `names` lists, in that order. Every listed
    name must be present: a subset with missing images would change the metric silently."""

    def __init__(self, source, names: list[str], subset: str):
        if not hasattr(source, "file_names"):
            raise ConfigError(f"data.eval_subset={subset!r} needs a source with file names "
                              f"(a folder or TFDS), not {source!r}; set data.eval_subset='' "
                              "to evaluate on the whole split")
        index = {name: i for i, name in enumerate(source.file_names())}
        missing = [n for n in names if n not in index]
        if missing:
            raise ConfigError(f"data.eval_subset={subset!r}: {len(missing)} of {len(names)} "
                              f"files are not in {source!r}, e.g. {missing[0]!r} (set "
                              "data.eval_subset='' to evaluate on the whole split)")
        self.source, self.indices, self.subset = source, [index[n] for n in names], subset

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.source[self.indices[i]]

    def __repr__(self) -> str:
        return f"Subset({self.subset!r} of {self.source!r}: {len(self)} examples)"


def _tfds_failure(tfds, name, split, data_dir, root, error) -> str:
    """A one-line explanation of why tfds.data_source failed, with the fix."""
    try:
        prepared = tfds.builder(name, data_dir=data_dir or None).is_prepared()
    except Exception:
        prepared = False
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    build = f"`tfds build {name} --file_format=array_record --data_dir={root}`"
    if not prepared:
        manual = (f" (ImageNet needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
                  f"{os.path.join(root, 'downloads', 'manual')} first)"
                  if name.startswith("imagenet") else "")
        return (f"tfds dataset {name!r} is not prepared in data dir {root!r} and downloads are "
                f"disabled; prepare it once with {build}{manual}")
    return (f"tfds dataset {name!r} split {split!r} in data dir {root!r} cannot be opened as an "
            f"array_record data source ({type(error).__name__}: {first_line}); if it was "
            f"prepared as tfrecord, rebuild it with {build}")


# --------------------------------------------------------------------------- dispatch

def make_source(config, split_name: str):
    """The source for role `split_name` ('train' or 'eval') of `config.data.name`.

    'embedded': EmbeddedPhotos, whose eval role is FixedCrops of the held-out photos at
    config.image_size (data.eval_crops per photo, placed by data.eval_crop_seed);
    'folder': ImageFolder(data.dir/<train_split|eval_split>);
    'tfds:<name>': tfds_source(<name>, <train_split|eval_split>, data.dir).
    For 'eval', data.eval_subset (a named subset or a file of file names) selects a fixed list
    of images, e.g. 'imagenet_val_5k', the rFID-5k protocol.
    """
    if split_name not in ("train", "eval"):
        raise ValueError(f"split_name must be 'train' or 'eval', got {split_name!r}")
    data = config.data
    split = data.train_split if split_name == "train" else data.eval_split
    name = data.name
    if name == "embedded":
        source = (EmbeddedPhotos("train") if split_name == "train"
                  else FixedCrops(EmbeddedPhotos("eval"), config.image_size,
                                  per_image=data.get("eval_crops", 8),
                                  seed=data.get("eval_crop_seed", 0)))
    elif name == "folder":
        if not data.dir:
            raise ConfigError("data.name='folder' needs data.dir (the folder holding the splits)")
        source = ImageFolder(os.path.join(data.dir, split))
    elif isinstance(name, str) and name.startswith("tfds:") and len(name) > len("tfds:"):
        source = tfds_source(name[len("tfds:"):], split, data.dir)
    else:
        raise ConfigError(f"unknown data.name={name!r}; expected 'embedded', 'folder' or "
                          "'tfds:<tfds dataset name>' (e.g. 'tfds:imagenet2012')")
    if split_name == "eval" and data.eval_subset:
        return Subset(source, subset_names(data.eval_subset), data.eval_subset)
    return source


def cache_source(config, role: str):
    """What the latent cache encodes for `role` ('train' or 'eval'): the role's source, except
    that with cache.crops_per_image = k > 1 the train role is k fixed crops of each image (the
    demo turns its 15 training photos into 480 examples labelled by photo)."""
    source = make_source(config, role)
    k = config.cache.crops_per_image
    if k < 1:
        raise ConfigError(f"cache.crops_per_image={k} must be >= 1")
    if role == "train" and k > 1:
        return FixedCrops(source, config.image_size, per_image=k, seed=config.seed)
    return source
