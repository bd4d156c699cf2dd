"""`python -m dgae_jax.compare NAME=RUN[,RUN...] NAME=RUN[,RUN...] [--out=PREFIX]`: models
compared over training seeds.

Each NAME is a model trained once per seed, each RUN one of its workdirs (the same config but
`--config.seed`). From the evaluations the runs wrote (`eval/<step>.json`) it gives:
  * a table at the final step: per model and metric (PSNR, SSIM, LPIPS, rFID where present) the
    mean over seeds, the seeds' spread (sample standard deviation; with 2 seeds it is
    |a - b| / sqrt(2)) and the bootstrap spread over the evaluation images (the mean of the runs'
    `bootstrap_std`); with two models, the difference of means and whether it is beyond the noise:
    larger than twice the larger of the two seed spreads;
  * `PREFIX.png` (with --out): each metric against training step, one line per model (the mean
    over seeds) with each seed's own line faint;
  * `PREFIX-images.png` (with --out and --images=TAG): the evaluation grid `images/<step>-<TAG>.png`
    of each model's first run at its final step (models may end at different steps, e.g. a
    teacher and its student), stacked as the inputs (checked equal across models) over each
    model's reconstructions of them.
`--tag=TAG` takes the table from the tagged evaluations (`eval/<step>-<TAG>.json`, e.g. at a
decode setting chosen after training); the curves always come from the runs' own evaluations.
The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
from absl import app, flags
from PIL import Image

from dgae_jax import grids
from dgae_jax.errors import ConfigError

_OUT = flags.DEFINE_string("out", "", "Write PREFIX.png (curves) and PREFIX-images.png.")
_TAG = flags.DEFINE_string("tag", "", "Table from eval/<step>-<TAG>.json instead of <step>.json.")
_IMAGES = flags.DEFINE_string("images", "", "Stack images/<step>-<IMAGES>.png of each model.")
_TITLE = flags.DEFINE_string("title", "", "Figure title.")

METRICS = (("psnr", "PSNR (dB)", +1), ("ssim", "SSIM", +1), ("lpips", "LPIPS", -1),
           ("rfid", "rFID", -1))  # key, label, +1 if higher is better
IMAGE_PAD = 2  # grids.image_grid's gap between rows


def parse_groups(args: list[str]) -> dict[str, list[str]]:
    """['DGAE=a,b', 'SD-VAE=c,d'] -> {'DGAE': ['a', 'b'], 'SD-VAE': ['c', 'd']}."""
    groups = {}
    for arg in args:
        name, sep, runs = arg.partition("=")
        if not sep or not name or not runs:
            raise ConfigError(f"{arg!r} is not NAME=RUN[,RUN...]")
        if name in groups:
            raise ConfigError(f"model {name!r} is named twice")
        groups[name] = [r for r in runs.split(",") if r]
    if not groups:
        raise ConfigError("give at least one NAME=RUN[,RUN...]")
    return groups


def evaluations(run: str, tag: str = "") -> dict[int, dict]:
    """{step: results} of a run's eval/<step>.json files (eval/<step>-<tag>.json with a tag)."""
    directory = os.path.join(run, "eval")
    pattern = re.compile(rf"(\d+){re.escape('-' + tag) if tag else ''}\.json")
    found = {}
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        match = pattern.fullmatch(name)
        if match:
            with open(os.path.join(directory, name)) as f:
                found[int(match.group(1))] = json.load(f)
    if not found:
        raise ConfigError(f"{run!r} has no evaluation {'eval/<step>' + (f'-{tag}' if tag else '')}"
                          ".json")
    return found


def summarize(values: list[float], bootstrap: list[float]) -> dict:
    """Mean, seed spread (sample std; 0 for one seed) and mean bootstrap spread of one metric."""
    return {"mean": float(np.mean(values)),
            "seed_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "bootstrap_std": float(np.mean(bootstrap)) if bootstrap else None,
            "seeds": [float(v) for v in values]}


def final_table(groups: dict[str, list[str]], tag: str = "") -> dict:
    """Per model: the step, decode setting and metric summaries of its runs' final evaluations
    (all runs must have reached the same step); with two models, their comparison."""
    table = {}
    for name, runs in groups.items():
        finals = {run: max(evaluations(run, tag).items()) for run in runs}
        steps = {step for step, _ in finals.values()}
        if len(steps) != 1:
            raise ConfigError(f"the runs of {name!r} end at different steps: "
                              + ", ".join(f"{r} at {s}" for r, (s, _) in finals.items()))
        results = [r for _, r in finals.values()]
        entry = {"step": steps.pop(), "runs": runs, "num_images": results[0]["num_images"],
                 "decode": {k: results[0][k] for k in ("decode_steps", "sampler", "spacing")
                            if k in results[0]}}
        for key, _, _ in METRICS:
            if all(key in r for r in results):
                entry[key] = summarize([r[key] for r in results],
                                       [r["bootstrap_std"][key] for r in results
                                        if key in r.get("bootstrap_std", {})])
        table[name] = entry
    record = {"models": table}
    if len(table) == 2:
        (a, ta), (b, tb) = table.items()
        record["difference"] = {}
        for key, _, sign in METRICS:
            if key in ta and key in tb:
                diff = ta[key]["mean"] - tb[key]["mean"]
                noise = 2 * max(ta[key]["seed_std"], tb[key]["seed_std"])
                record["difference"][key] = {
                    f"{a} - {b}": diff, "twice_larger_seed_std": noise,
                    "beyond_noise": abs(diff) > noise,
                    "better": (a if diff * sign > 0 else b) if abs(diff) > noise else None}
    return record


def markdown(record: dict) -> str:
    """The table as markdown: mean ± seed spread (bootstrap spread) per metric."""
    table = record["models"]
    keys = [(k, label) for k, label, _ in METRICS if all(k in t for t in table.values())]
    lines = ["| model | seeds | " + " | ".join(label for _, label in keys) + " |",
             "|---|---:|" + "---:|" * len(keys)]
    for name, t in table.items():
        cells = [f"{t[k]['mean']:.3f} ± {t[k]['seed_std']:.3f}"
                 + (f" ({t[k]['bootstrap_std']:.3f})" if t[k]["bootstrap_std"] is not None
                    else "") for k, _ in keys]
        lines.append(f"| {name} | {len(t['runs'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(groups: dict[str, list[str]], title: str = "") -> bytes:
    """PNG bytes: one panel per metric the runs have, against training step."""
    curves = {name: [evaluations(run) for run in runs] for name, runs in groups.items()}
    keys = [(k, label) for k, label, _ in METRICS
            if all(k in r for runs in curves.values() for evals in runs for r in evals.values())]
    fig, axes = grids.metric_panels(len(keys))
    for ax, (key, label) in zip(axes, keys):
        for i, (name, runs) in enumerate(curves.items()):
            colour = f"C{i}"
            steps = sorted(set.intersection(*(set(evals) for evals in runs)))
            for evals in runs:
                ax.plot(sorted(evals), [evals[s][key] for s in sorted(evals)], color=colour,
                        alpha=0.3, linewidth=1)
            ax.plot(steps, [np.mean([evals[s][key] for evals in runs]) for s in steps],
                    color=colour, marker="o", label=f"{name} (mean of {len(runs)})")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    return grids.panels_png(fig, axes, title)


def stack_images(groups: dict[str, list[str]], steps: dict[str, int], tag: str) -> np.ndarray:
    """The inputs over each model's reconstructions, from each model's first run's evaluation
    grid at its step in `steps` (inputs row over reconstructions row); the inputs must be the
    same images."""
    inputs, rows = None, []
    for name, runs in groups.items():
        path = os.path.join(runs[0], "images", f"{steps[name]}-{tag}.png")
        if not os.path.isfile(path):
            raise ConfigError(f"{path!r} does not exist (an evaluation with eval.tag={tag!r})")
        grid = np.asarray(Image.open(path).convert("RGB"))
        height = (grid.shape[0] - IMAGE_PAD) // 2
        top, bottom = grid[:height], grid[height + IMAGE_PAD:]
        if inputs is None:
            inputs = top
        elif not np.array_equal(inputs, top):
            raise ConfigError(f"{path!r} shows other input images than the first model's")
        rows.append(bottom)
    gap = np.full((IMAGE_PAD, inputs.shape[1], 3), 255, np.uint8)
    parts = [inputs]
    for row in rows:
        parts += [gap, row]
    return np.concatenate(parts)


def main(argv) -> None:
    try:
        run(argv[1:])
    except ConfigError as error:
        sys.exit(f"error: {error}")


def run(args: list[str]) -> dict:
    groups = parse_groups(args)
    record = final_table(groups, _TAG.value)
    print(markdown(record))
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        record["curves_png"] = f"{_OUT.value}.png"
        with open(record["curves_png"], "wb") as f:
            f.write(plot_curves(groups, _TITLE.value))
        if _IMAGES.value:
            steps = {name: model["step"] for name, model in record["models"].items()}
            record["images_png"] = f"{_OUT.value}-images.png"
            Image.fromarray(stack_images(groups, steps, _IMAGES.value)).save(record["images_png"])
            record["images_rows"] = ["inputs", *groups]
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    app.run(main)
