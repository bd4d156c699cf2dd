"""Tiled reconstruction of a trained run: error of each compute dtype against float32, tiles
against one piece, memory and time per image size, and a picture of a photo reconstructed in
tiles.

    python benchmarks/tiling.py --run=runs/fair/f16c8-dgae-s0 --steps=2 \
        --picture=docs/images/tiled-astronaut.png

Inputs are scikit-image's astronaut (512 x 512), resized (bicubic) to each size. The dtype rows
reconstruct the 512 px photo in tiles of the training size; each size runs in its own process
so that its peak resident memory (ru_maxrss) is its own, after a warm-up call that compiles the
tile networks, which XLA's memory analysis then reports (the same tile shape for every size).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
from PIL import Image
from skimage import data

from dgae_jax import api, tiling

DTYPES = ("float32", "bfloat16", "float16")


def astronaut(size: int) -> np.ndarray:
    image = Image.fromarray(data.astronaut())
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def dtype_rows(run: str, steps: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Per dtype: the reconstruction's max abs difference and PSNR against float32's, its PSNR
    against the input, and whether the latents are finite."""
    image, rows, reference = astronaut(512), [], None
    for dtype in DTYPES:
        ae = api.load(run, dtype=dtype)
        z = ae.encode(image)
        recon = ae.reconstruct(image, steps=steps)[0]
        if reference is None:
            reference = recon
        rows.append({"dtype": dtype, "latents_finite": bool(np.all(np.isfinite(z))),
                     "max_abs_diff_vs_float32": int(np.abs(recon.astype(int) - reference).max()),
                     "psnr_vs_float32": psnr(recon, reference),
                     "psnr_vs_input": psnr(recon, image)})
    return rows, image, reference


def tiled_against_whole(run: str, steps: int, size: int = 128) -> dict:
    """A `size` px photo reconstructed in tiles of the training size and in one piece (both fit
    in memory at this size): PSNR of each against the input and of one against the other."""
    ae, image = api.load(run), astronaut(size)
    tiled, whole = (ae.reconstruct(image, steps=steps, tile=t)[0] for t in (None, 0))
    return {"size": size, "psnr_tiled_vs_input": psnr(tiled, image),
            "psnr_whole_vs_input": psnr(whole, image), "psnr_tiled_vs_whole": psnr(tiled, whole)}


def picture(image: np.ndarray, recon: np.ndarray, tile: int, factor: int, path: str) -> None:
    """Input | tiled reconstruction, with ticks in the margin above and left of the
    reconstruction where each tile starts and ends (the image itself is not drawn on)."""
    h = image.shape[0] // factor
    grid = tiling.Grid.of(h, h, tile // factor)
    edges = sorted({y * factor + e for y, _, _, _ in grid.boxes for e in (0, tile)})
    margin, gap = 6, 8
    size = image.shape[0]
    canvas = np.full((size + margin, 2 * size + gap + margin, 3), 255, np.uint8)
    canvas[margin:, :size] = image
    left = size + gap + margin
    canvas[margin:, left:] = recon
    for e in edges:
        e = min(e, size - 1)
        canvas[:margin - 1, left + e] = (200, 0, 0)
        canvas[margin + e, size + gap:left - 1] = (200, 0, 0)
    Image.fromarray(canvas).save(path, optimize=True)


def one_size(run: str, steps: int, size: int) -> dict:
    """Time and memory of reconstructing one `size` px image in tiles (runs in a child)."""
    ae = api.load(run)
    ae.reconstruct(astronaut(2 * ae.config.image_size), steps=steps)  # compiles the tiles
    image = astronaut(size)
    start = time.perf_counter()
    ae.reconstruct(image, steps=steps)
    seconds = time.perf_counter() - start
    f = ae.config.model.spatial_factor
    tile = ae.config.image_size
    x = np.zeros((ae.batch_size, tile, tile, 3), np.float32)
    z = np.zeros((ae.batch_size, tile // f, tile // f, ae.config.model.latent_channels),
                 np.float32)
    memory = ae._tile_velocity.lower(ae.model, ae.params, ae._shard(x), np.float32(0.5),
                                     ae._shard(z)).compile().memory_analysis()
    step_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                  - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return {"size": size, "seconds": seconds, "seconds_per_megapixel": seconds / (size**2 / 1e6),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "image_float32_mib": size * size * 3 * 4 / 2**20,
            "tile_step_mib": step_bytes / 2**20,
            "velocity_compilations": ae._tile_velocity._cache_size()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained DGAE run's workdir or bundle")
    parser.add_argument("--steps", type=int, default=2, help="decode steps")
    parser.add_argument("--sizes", default="256,1024,4096")
    parser.add_argument("--picture", default="", help="PNG path for the picture")
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)  # a child
    args = parser.parse_args()
    if args.size:
        print(json.dumps(one_size(args.run, args.steps, args.size)))
        return
    rows, image, recon = dtype_rows(args.run, args.steps)
    against_whole = tiled_against_whole(args.run, args.steps)
    if args.picture:
        ae = api.load(args.run)
        picture(image, recon, ae.config.image_size, ae.config.model.spatial_factor,
                args.picture)
    sizes = []
    for size in map(int, args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, f"--run={args.run}",
                              f"--steps={args.steps}", f"--size={size}"], check=True,
                             capture_output=True, text=True)
        sizes.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"run": args.run, "steps": args.steps, "dtypes": rows,
                      "tiled_vs_whole": against_whole, "sizes": sizes}, indent=1))


if __name__ == "__main__":
    main()
