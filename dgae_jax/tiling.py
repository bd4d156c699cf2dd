"""Images larger than the training size, decoded and encoded in tiles of it, without seams.

A plane of h x w latent positions is covered by square tiles of the training latent size that
overlap their neighbours by at least `overlap` positions (`Grid`). Each tile's output is weighted
by a window that is 1 inside the tile and falls smoothly (sin^2) to almost 0 over the overlap on
every side that has a neighbour, and the weighted outputs are summed and divided by the summed
weights, so every position is a convex blend of the tiles covering it and a single tile is left
as it is (its window is 1 everywhere).

What is blended differs by network:
- DGAE's diffusion decoder: the *velocity* at every sampler step (MultiDiffusion, Bar-Tal et al.
  2023, arXiv 2302.08113), so all tiles follow one trajectory of one image; the sampler runs on
  the host in float32 (`diffusion.integrate_step`), the U-Net on batches of tiles.
- the SD-VAE encoder and conv decoder: their outputs (posterior moments, pixels), once.

The networks only ever see batches of `batch` tiles of one shape, so each compiles once per tile
shape whatever the image size; the host holds the image, its tiles of one batch and the
accumulated blend, so memory beyond the image itself does not grow with it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from dgae_jax import diffusion


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts covering [0, length) with tiles of `tile` that overlap by >= `overlap`,
    evenly spread (the first at 0, the last ending at `length`)."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def ramp(size: int, overlap: int, before: bool, after: bool) -> np.ndarray:
    """1-D window: 1, falling as sin^2 to near 0 over `overlap` positions at each end that has a
    neighbour (never exactly 0, so every covered position has weight)."""
    w = np.ones(size, np.float32)
    if overlap:
        rise = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        if before:
            w[:overlap] = rise
        if after:
            w[size - overlap:] = rise[::-1]
    return w


@dataclasses.dataclass(frozen=True)
class Grid:
    """Tiles of `tile` x `tile` latent positions over an h x w latent plane."""

    h: int
    w: int
    tile: int
    overlap: int

    @classmethod
    def of(cls, h: int, w: int, tile: int) -> "Grid":
        """The grid the API uses: neighbours share a quarter of a tile (at least a position)."""
        return cls(h, w, tile, max(1, tile // 4))

    @property
    def boxes(self) -> list[tuple[int, int, tuple[bool, bool], tuple[bool, bool]]]:
        """(y, x, rows, cols) of every tile, row by row: its latent start, and whether it has a
        neighbour (before, after) along its rows and along its columns (where `ramp` falls)."""
        ys, xs = starts(self.h, self.tile, self.overlap), starts(self.w, self.tile, self.overlap)
        return [(y, x, (i > 0, i < len(ys) - 1), (j > 0, j < len(xs) - 1))
                for i, y in enumerate(ys) for j, x in enumerate(xs)]

    def map(self, fn: Callable, planes: list[tuple[np.ndarray, int]], scale: int,
            batch: int) -> np.ndarray:
        """The blend over tiles of `fn(*tile_batches)`: each of `planes` is (array, samples per
        latent position), cut into tiles that `fn` receives in batches of exactly `batch` (the
        last padded with zeros, so it sees one shape); `fn` returns (batch, tile * scale,
        tile * scale, C), blended onto the (h * scale, w * scale, C) plane. Only the plane, the
        weights' sum and one batch of tiles are held at a time."""
        boxes, size = self.boxes, self.tile * scale
        out, norm = None, np.zeros((self.h * scale, self.w * scale), np.float32)
        for start in range(0, len(boxes), batch):
            chunk = boxes[start:start + batch]
            args = []
            for plane, s in planes:
                tiles = np.zeros((batch, self.tile * s, self.tile * s, plane.shape[-1]),
                                 plane.dtype)
                for k, (y, x, _, _) in enumerate(chunk):
                    tiles[k] = plane[y * s:y * s + self.tile * s, x * s:x * s + self.tile * s]
                args.append(tiles)
            result = np.asarray(fn(*args), np.float32)
            if out is None:
                out = np.zeros((*norm.shape, result.shape[-1]), np.float32)
            for (y, x, rows, cols), tile in zip(chunk, result):
                weight = np.outer(ramp(size, self.overlap * scale, *rows),
                                  ramp(size, self.overlap * scale, *cols))
                out[y * scale:y * scale + size, x * scale:x * scale + size] += (
                    weight[..., None] * tile)
                norm[y * scale:y * scale + size, x * scale:x * scale + size] += weight
        return out / norm[..., None]


def decode_flow(velocity: Callable, grid: Grid, z: np.ndarray, noise: np.ndarray, factor: int,
                steps: int, sampler: str, spacing: str, batch: int) -> np.ndarray:
    """DGAE's decode of latent `z` (h, w, c) from `noise` (h f, w f, 3), tile by tile:
    `velocity(x_tiles, t, z_tiles)` is the U-Net on a batch of tiles at time t; the blended
    velocity drives one float32 Euler/Heun trajectory of the whole image."""

    def v(x: np.ndarray, t: np.float32) -> np.ndarray:
        return grid.map(lambda xt, zt: velocity(xt, t, zt), [(x, factor), (z, 1)], factor,
                        batch)

    times = np.asarray(diffusion.time_grid(steps, spacing), np.float32)
    x = np.asarray(noise, np.float32)
    for t, t_next in zip(times[:-1], times[1:]):
        x = diffusion.integrate_step(v, x, t, t_next, sampler)
    return x
