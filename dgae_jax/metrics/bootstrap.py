"""The spread of a mean metric over an evaluation set, by the bootstrap (Efron, 1979).

An evaluation reports the mean PSNR / SSIM / LPIPS of N images; with a small N (the demo's held-out
crops) that mean moves with the choice of images as much as with the model. Resampling the N
per-image values with replacement and taking the standard deviation of the resampled means
measures that movement, so a difference between two models can be set against it.
"""

from __future__ import annotations

import numpy as np


def bootstrap_std(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> float:
    """Standard deviation of the mean of `values` (1-D) over `resamples` resamples of the same
    size, drawn with replacement by a generator seeded with `seed`. The values are sorted first,
    so the result depends on the set of values only, not on their order (which differs between
    runs on different process counts)."""
    values = np.sort(np.asarray(values, np.float64))
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"expected a non-empty 1-D array, got shape {values.shape}")
    picks = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    return float(np.std(values[picks].mean(axis=1)))
