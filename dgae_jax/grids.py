"""Image grids for TensorBoard and PNG files."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def image_grid(rows: np.ndarray, pad: int = 2) -> np.ndarray:
    """(R, N, H, W, 3) uint8 -> one (R*(H+pad)-pad, N*(W+pad)-pad, 3) image, white gaps."""
    r, n, h, w, c = rows.shape
    grid = np.full((r * (h + pad) - pad, n * (w + pad) - pad, c), 255, np.uint8)
    for i in range(r):
        for j in range(n):
            grid[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = rows[i, j]
    return grid


def save_png(image: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)
