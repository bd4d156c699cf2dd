"""`--mode=sweep`: a checkpoint's reconstruction metrics at every decode setting of a grid.

The paper does not state its decode sampler or number of steps, and its reconstruction numbers
depend on them. The sweep evaluates the EMA autoencoder at every combination of
`eval.sweep_steps` x `eval.sweep_samplers` x `eval.sweep_spacings` with the task's evaluator (the
same metrics, images and noise as `--mode=eval`; only the decode is recompiled per setting) and
writes `<workdir>/eval/sweep-<step>.json` (one row per setting) and `sweep-<step>.png` (rFID,
PSNR and LPIPS against network evaluations, one line per sampler x spacing).

Choose the setting on a split other than the one you report, so the choice does not fit the
reported images: sweep on a different validation subset or a held-out part of the training data
(`--config.data.eval_split=... --config.data.eval_subset=...`, or for the embedded photos other
crops, `--config.data.eval_crop_seed=1`), then report with `--mode=eval
--config.diffusion.sample_steps=N --config.diffusion.sampler=S --config.diffusion.spacing=T` on
the reported split.
"""

from __future__ import annotations

import json

import ml_collections
from absl import logging

from dgae_jax import checks, diffusion, grids, progress
from dgae_jax.modes.base import AUTOENCODER_TASKS, Mode, restored_run
from dgae_jax.tasks.base import AutoencoderLike

# What `seconds_per_image` measures, written next to the rows.
TIMING = ("seconds_per_image: wall time of the jitted reconstruction step (decode + PSNR/SSIM/"
          "LPIPS) per image slot, over every evaluation batch but the first (which compiles and "
          "is excluded); data loading and rFID's Inception features excluded; null when the "
          "evaluation set is one batch")
# The panels of the plot, in order, when the rows have them: (row key, axis label).
PANELS = (("rfid", "rFID"), ("psnr", "PSNR (dB)"), ("lpips", "LPIPS"))


def _line(row: dict) -> tuple:
    """The plotted line of a row: (decoder of a distillation run,) sampler, spacing."""
    return tuple(row[k] for k in ("decoder", "sampler", "spacing") if k in row)


def sweep(config: ml_collections.ConfigDict, workdir: str, task: AutoencoderLike) -> dict:
    """The evaluation of a saved run's EMA autoencoder (the newest intact checkpoint, or
    eval.step) at every setting of the task's grid: PSNR, SSIM, LPIPS, rFID (with eval.rfid),
    network evaluations (NFE) and seconds per image (of the reconstruction step, over every batch
    but the first, which compiles) of each. Process 0 writes the JSON and the plot; every process
    computes. Returns {'step', 'rows', 'json', 'png', 'timing'}."""
    run, step, params = restored_run(config, workdir, task, config.eval.step, "eval.step")
    evaluator, grid, rows = task.evaluator(run), task.sweep_settings(), []
    with progress.bar(len(grid), "sweep", unit="setting") as meter:
        for s in grid:
            results = evaluator.evaluate(params, step, grid=False, timed=True, **s)
            row = {**s, "nfe": diffusion.nfe(s["steps"], s["sampler"])}
            row.update({k: results[k] for k in ("psnr", "ssim", "lpips", "rfid") if k in results})
            row["seconds_per_image"] = results["seconds_per_image"]
            row["num_images"] = results["num_images"]
            row["bootstrap_std"] = results["bootstrap_std"]
            logging.info("sweep of step %d: %s", step, row)
            rows.append(row)
            meter.update(1)
    directory = run.workdir / "eval"
    name = f"sweep-{run.eval_name(step)}"
    json_path, png_path = directory / f"{name}.json", directory / f"{name}.png"
    record = {"step": step, "rows": rows, "json": str(json_path), "png": str(png_path),
              "timing": TIMING}
    if run.is_lead:
        directory.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(record, indent=1))
        png_path.write_bytes(plot(rows, f"{run.workdir.name}, step {step}"))
    run.writer.flush()
    return record


def plot(rows: list[dict], title: str = "") -> bytes:
    """PNG bytes: one panel per metric the rows have (rFID, PSNR, LPIPS) against NFE on a log
    axis, one line per sampler x spacing. Drawn on matplotlib's Agg canvas directly (no pyplot,
    so no global backend state)."""
    from matplotlib.ticker import FuncFormatter

    panels = [(key, label) for key, label in PANELS if any(key in r for r in rows)]
    fig, axes = grids.metric_panels(len(panels))
    lines = sorted({_line(r) for r in rows})
    for ax, (key, label) in zip(axes, panels):
        for line in lines:
            points = sorted((r["nfe"], r[key]) for r in rows if _line(r) == line and key in r)
            ax.plot(*zip(*points), marker="o", label=", ".join(line))
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 2, 4, not 2^k
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    return grids.panels_png(fig, axes, title)


def check(config: ml_collections.ConfigDict, device_count: int | None) -> None:
    """A diffusion decoder, and a grid of distinct steps, samplers and spacings."""
    checks.require(config.model.decoder == "diffusion",
                   f"--mode=sweep needs model.decoder='diffusion', not {config.model.decoder!r}: "
                   "the conv decoder (SD-VAE baseline) has no decode steps, sampler or spacing to "
                   "sweep")
    e = config.eval
    checks.distinct_positive_ints(e.sweep_steps, "eval.sweep_steps")
    for field, allowed in (("sweep_samplers", diffusion.SAMPLERS),
                           ("sweep_spacings", diffusion.SPACINGS)):
        values = tuple(e[field])
        checks.require(bool(values) and set(values) <= set(allowed)
                       and len(set(values)) == len(values),
                       f"eval.{field}={values!r} must be distinct names from {allowed}, at least "
                       "one")


MODE = Mode(sweep, AUTOENCODER_TASKS, check=check)
