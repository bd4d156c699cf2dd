"""`--mode=sweep`: a checkpoint's reconstruction metrics at every decode setting of a grid.

The paper does not state its decode sampler or number of steps, and its reconstruction numbers
depend on them. The sweep evaluates the EMA autoencoder at every combination of
`eval.sweep_steps` x `eval.sweep_samplers` x `eval.sweep_spacings` with the task's evaluator (the
same metrics, images and noise as `--mode=eval`; only the decode is recompiled per setting) and
writes `<workdir>/eval/sweep-<step>.json` (one row per setting) and `sweep-<step>.png` (rFID,
PSNR and LPIPS against network evaluations, one line per sampler x spacing).

Choose the setting on a split other than the one reported, then report it with `--mode=eval`
(see `modes.sweep` and the README).
"""

from __future__ import annotations

import itertools
import json

from absl import logging

from dgae_jax import grids, progress
from dgae_jax.tasks.base import Run

# What `seconds_per_image` measures, written next to the rows.
TIMING = ("seconds_per_image: wall time of the jitted reconstruction step (decode + PSNR/SSIM/"
          "LPIPS) per image slot, over every evaluation batch but the first (which compiles and "
          "is excluded); data loading and rFID's Inception features excluded; null when the "
          "evaluation set is one batch")
# The panels of the plot, in order, when the rows have them: (row key, axis label).
PANELS = (("rfid", "rFID"), ("psnr", "PSNR (dB)"), ("lpips", "LPIPS"))


def nfe(steps: int, sampler: str) -> int:
    """Velocity-network evaluations of one decode: Euler one per step; Heun two per step, the
    last included (`diffusion.sample` evaluates the corrector at t = 0 too)."""
    return steps * {"euler": 1, "heun": 2}[sampler]


def settings(config) -> list[dict]:
    """The grid, grouped by sampler x spacing (one plotted line each), steps as configured. A
    distillation run's grid is its student's, then its teacher's at eval.sweep_teacher_steps
    (the teacher's sampler and spacing), so both are on one plot."""
    e = config.eval
    grid = [{"steps": int(n), "sampler": sampler, "spacing": spacing}
            for sampler, spacing, n in itertools.product(e.sweep_samplers, e.sweep_spacings,
                                                         e.sweep_steps)]
    if config.task != "distill":
        return grid
    d = config.distill
    return [dict(s, decoder="student") for s in grid] + [
        {"steps": int(n), "sampler": d.teacher_sampler, "spacing": d.teacher_spacing,
         "decoder": "teacher"} for n in e.sweep_teacher_steps]


def _line(row: dict) -> tuple:
    """The plotted line of a row: (decoder of a distillation run,) sampler, spacing."""
    return tuple(row[k] for k in ("decoder", "sampler", "spacing") if k in row)


def sweep(run: Run, evaluator, params, step: int) -> dict:
    """Evaluates `params` at every setting of `run.config`'s grid; process 0 writes the JSON and
    the plot. Returns {'step', 'rows', 'json', 'png', 'timing'}."""
    rows, grid = [], settings(run.config)
    with progress.bar(len(grid), "sweep", unit="setting") as meter:
        for s in grid:
            results = evaluator.evaluate(params, step, grid=False, timed=True, **s)
            row = {**s, "nfe": nfe(s["steps"], s["sampler"])}
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
