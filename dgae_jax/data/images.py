"""Image files to uint8 RGB, whatever their mode; `errors.BadImage` for those that cannot be.

Real folders hold more than 8-bit RGB JPEGs: grayscale and palette images, CMYK JPEGs, RGBA and
LA PNGs, 16-bit PNGs, and phone photos stored sideways with an EXIF orientation. Each becomes
upright 8-bit RGB: EXIF orientation applied, 16-bit samples scaled (v / 257, rounded), alpha
composited over white (as a page shows it; the colour under a transparent pixel is arbitrary),
everything else through PIL's RGB conversion. An empty, truncated or undecodable file raises
`BadImage` naming it; data/bad_images.py decides what a run does about it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from dgae_jax.errors import BadImage

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL image -> contiguous uint8 HxWx3 (see the module docstring)."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))


def decode_image_bytes(data: bytes, path: str) -> np.ndarray:
    """Encoded bytes -> upright uint8 RGB; `BadImage` (naming `path`) on any failure."""
    if not data:
        raise BadImage(path, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a truncated file fails here, not later in a worker
            return pil_to_rgb(ImageOps.exif_transpose(image))
    except Exception as error:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise BadImage(path, f"{type(error).__name__}: {error}") from error


def decode_image_file(path: str) -> np.ndarray:
    """One file -> upright uint8 RGB; `BadImage` naming the file on any failure."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise BadImage(path, f"{type(error).__name__}: {error}") from error
    return decode_image_bytes(data, path)
