"""`--mode=reconstruct`: a trained run's reconstructions of your own images, with their metrics.

    python -m dgae_jax.main --config=CONFIG --workdir=RUN --mode=reconstruct \\
        --config.reconstruct.input=FILE_OR_DIR --config.reconstruct.output=OUT

Writes into OUT: each reconstruction as a PNG under its input's relative name (extension .png),
`comparison.png` (the first reconstruct.grid_images inputs over their reconstructions) and
`metrics.json` (PSNR, SSIM and LPIPS per image and their means). Images go through the Python
API at their own size (api.py: same padding, tiling and seeding), so
`api.load(RUN, dtype=D).reconstruct(images, tile=T)` gives these same pixels; metrics compare
each reconstruction with its input. `reconstruct.tile` (None: tile images larger than the
training size; 0: never; N: N-pixel tiles) and `reconstruct.dtype` (None: the run's) are the
API's `tile` and `dtype`; decode settings are the config's (`--config.diffusion.sample_steps=...`).
One process: the work is per image.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from dgae_jax import api, checks, grids, pixels, progress
from dgae_jax.data import images as image_files, sources
from dgae_jax.errors import ConfigError
from dgae_jax.metrics import image as image_metrics, lpips
from dgae_jax.autoencoder import check_tile
from dgae_jax.modes.base import AUTOENCODER_TASKS, Mode
from dgae_jax.tasks.base import AutoencoderLike

GRID_COLUMNS = 8


def input_files(path: str) -> list[tuple[str, str]]:
    """(relative name, path) of the image `path` or of every image under the folder `path`."""
    if os.path.isdir(path):
        found = sources.find_images(path)
        if not found:
            raise ConfigError(f"reconstruct.input={path!r} holds no "
                              f"{'/'.join(sources.IMAGE_EXTENSIONS)} images")
        return [(rel, os.path.join(path, rel)) for rel in found]
    if not os.path.isfile(path):
        raise ConfigError(f"reconstruct.input={path!r}: no such file or directory")
    return [(os.path.basename(path), path)]


def output_names(names: list[str]) -> list[str]:
    """Each relative name with the extension .png; two inputs that would share one (a.jpg and
    a.png) are an error rather than one overwriting the other."""
    out = [os.path.splitext(n)[0] + ".png" for n in names]
    seen: dict[str, str] = {}
    for name, png in zip(names, out):
        if png in seen:
            raise ConfigError(f"reconstruct.input: {seen[png]!r} and {name!r} would both be "
                              f"written as {png!r}")
        seen[png] = name
    return out


def reconstruct(config: ml_collections.ConfigDict, workdir: str, task: AutoencoderLike) -> dict:
    """Reconstructs reconstruct.input with the EMA parameters of reconstruct.step (default the
    newest intact checkpoint) and writes reconstruct.output; returns the mean metrics. LPIPS is
    the task's loss network, loaded for the metric when the loss has no LPIPS term."""
    lpips_weights = task.model.lpips_weights
    if lpips_weights is None:
        lpips_weights = lpips.load_weights(config.loss.lpips_net)
    r = config.reconstruct
    files = input_files(r.input)
    names = output_names([rel for rel, _ in files])
    images = [image_files.decode_image_file(path) for _, path in files]
    ae = api.TrainedAutoencoder.from_run(config, workdir, r.step, field="reconstruct.step",
                                         dtype=r.dtype)
    inputs = images
    recons = list(ae.reconstruct(inputs, seed=r.seed, tile=r.tile))
    rows = _metrics(config, lpips_weights, [rel for rel, _ in files], inputs, recons)
    out = os.path.abspath(r.output)
    for name, recon in zip(names, recons):
        path = os.path.join(out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(recon).save(path)
    shown = min(r.grid_images, len(inputs))
    grids.save_png(comparison(inputs[:shown], recons[:shown], config.image_size),
                   epath.Path(out) / "comparison.png")
    mean = {k: float(np.mean([row[k] for row in rows])) for k in ("psnr", "ssim", "lpips")}
    record = {"step": ae.step, "workdir": os.path.abspath(workdir), "input": r.input,
              "num_images": len(rows), "seed": r.seed, "lpips_net": config.loss.lpips_net,
              "tile": r.tile, "dtype": ae.config.model.dtype,
              **ae.model.decode_record(), "mean": mean, "images": rows}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(record, f, indent=1)
    return {k: v for k, v in record.items() if k != "images"} | {"output": out}


def _metrics(config, lpips_weights, names, inputs, recons) -> list[dict]:
    """PSNR and SSIM on the uint8 images (the usual convention), LPIPS in [-1, 1]; one jitted
    call per image shape."""
    distance = jax.jit(functools.partial(lpips.lpips_distance, net=config.loss.lpips_net))
    rows = []
    with progress.bar(len(inputs), "metrics", quiet=len(inputs) <= GRID_COLUMNS) as meter:
        for name, real, fake in zip(names, inputs, recons):
            a, b = np.float32(real[None]), np.float32(fake[None])
            rows.append({"name": name, "shape": list(real.shape),
                         "psnr": float(image_metrics.psnr(a, b)[0]),
                         "ssim": float(image_metrics.ssim(a, b)[0]),
                         "lpips": float(distance(lpips_weights, pixels.to_signed(a),
                                                 pixels.to_signed(b))[0])})
            meter.update(1)
    return rows


def comparison(inputs: list[np.ndarray], recons: list[np.ndarray], tile: int) -> np.ndarray:
    """Inputs over their reconstructions, GRID_COLUMNS pairs per band; images of another size
    than the first are shown resized to a `tile` square (the files keep their size)."""
    shape = inputs[0].shape if all(im.shape == inputs[0].shape for im in inputs) else (
        tile, tile, 3)

    def fit(image):
        if image.shape == shape:
            return image
        return np.asarray(Image.fromarray(image).resize((tile, tile), Image.Resampling.BICUBIC))

    rows = []
    for start in range(0, len(inputs), GRID_COLUMNS):
        band = [list(map(fit, images[start:start + GRID_COLUMNS])) for images in (inputs, recons)]
        for row in band:
            row += [np.full(shape, 255, np.uint8)] * (GRID_COLUMNS - len(row))
            rows.append(np.stack(row))
    if len(inputs) <= GRID_COLUMNS:  # a single band: no white padding columns
        rows = [row[:len(inputs)] for row in rows]
    return grids.image_grid(np.stack(rows))


def check(config: ml_collections.ConfigDict, device_count: int | None) -> None:
    r = config.reconstruct
    checks.require(bool(r.input),
                   "reconstruct.input is required: an image file or a folder of images")
    checks.require(os.path.exists(r.input),
                   f"reconstruct.input={r.input!r}: no such file or directory")
    checks.require(bool(r.output), "reconstruct.output is required: the directory to write into")
    checks.writable(r.output, "reconstruct.output")
    checks.optional_step(config, "reconstruct.step")
    checks.positive(config, "reconstruct.grid_images")
    check_tile(config, r.tile, "reconstruct.tile")
    if r.dtype is not None:
        checks.one_of(r.dtype, checks.DTYPES, "reconstruct.dtype")


MODE = Mode(reconstruct, AUTOENCODER_TASKS, one_process=True, check=check)
