"""The two ranges an image takes: uint8 [0, 255] in files and batches (4x less host-to-device
traffic than float32), float [-1, 1] inside the networks. Every conversion between them is here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def to_signed(images):
    """uint8 [0, 255] -> float32 [-1, 1]; a numpy array stays a numpy array (host-side
    preparation), a jax array stays on its devices."""
    return images.astype(np.float32) / 127.5 - 1.0


def to_uint8_range(x):
    """Model outputs in [-1, 1] -> the integer values (as float32) an 8-bit image would store.

    This is the convention for reporting PSNR/SSIM: metrics are computed on what a saved PNG
    would contain, so values are clipped to [0, 255] and rounded (half to even), not on the raw
    continuous outputs. A numpy array is converted on the host, anything else by jax.
    """
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.round(xp.clip((xp.asarray(x, np.float32) + 1.0) * 127.5, 0.0, 255.0))


def to_uint8(x):
    """Model outputs in [-1, 1] -> uint8 images, as `to_uint8_range` rounds them."""
    return to_uint8_range(x).astype(np.uint8)
