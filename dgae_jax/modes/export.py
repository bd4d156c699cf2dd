"""`--mode=export`: a trained run as a self-contained inference bundle, or in diffusers' format.

    python -m dgae_jax.main --config=CONFIG --workdir=RUN --mode=export --config.export.dir=OUT

export.format='dgae' (default) writes bundle.py's bundle: config.json, the EMA encoder and
decoder as model.safetensors, and a model card (model_card.json, README.md) with the step, the
run's evaluation figures of that step (eval/<step>.json, when the run evaluated it) and the
latent statistics. `api.load(OUT)` then gives the same reconstructions as `api.load(RUN)`.

export.format='diffusers' (the SD-VAE baseline, model.decoder='conv') writes a diffusers
`AutoencoderKL` directory (diffusers_io.py) with the same card, its `scaling_factor` the run's
model.scaling_factor when it has one (a decoder trained on SD's frozen encoder keeps SD's
0.18215, so pipelines built on SD's latents use it unchanged), else 1 / (the latents' standard
deviation), the convention of Rombach et al. (2022) that gave SD's.

Latent statistics: the posterior means of the first export.stat_images images of the
evaluation split (the evaluation view), per channel and over all elements.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from dgae_jax import api, bundle, checkpoint, checks, diffusers_io, progress
from dgae_jax.data import pipeline
from dgae_jax.modes.base import AUTOENCODER_TASKS, Mode

FORMATS = ("dgae", "diffusers")


def latent_statistics(config: ml_collections.ConfigDict, ae: api.TrainedAutoencoder) -> dict:
    """Mean and standard deviation of posterior means over evaluation images."""
    limit, means = config.export.stat_images, []
    seen = 0
    with progress.bar(limit, "latent statistics") as meter:
        for batch in pipeline.eval_dataset(config):
            images = batch["image"][batch["mask"]][:limit - seen]
            if len(images):
                means.append(ae.encode(images))
                seen += len(images)
                meter.update(len(images))
            if seen >= limit:
                break
    z = np.concatenate(means).astype(np.float64)
    axes = tuple(range(z.ndim - 1))
    return {"num_images": seen, "split": f"{config.data.name} {config.data.eval_split}",
            "mean": float(z.mean()), "std": float(z.std()),
            "channel_mean": z.mean(axis=axes).round(6).tolist(),
            "channel_std": z.std(axis=axes).round(6).tolist()}


def evaluation_of(workdir: str, step: int) -> dict | None:
    """The run's evaluation of `step` (eval/<step>.json), if it made one."""
    path = checkpoint.run_directory(workdir) / "eval" / f"{step}.json"
    return json.loads(path.read_text()) if path.exists() else None


def model_card(config: ml_collections.ConfigDict, workdir: str, ae: api.TrainedAutoencoder,
               stats: dict) -> dict:
    counts = {m: int(sum(np.size(a) for a in jax.tree.leaves(ae.params[m])))
              for m in ("encoder", "decoder")}
    return {"name": config.name, "source": os.path.abspath(workdir), "step": ae.step,
            "decoder": config.model.decoder, "image_size": config.image_size,
            "latent_shape": list(ae.latent_shape), "size_multiple": ae.size_multiple,
            "parameters": counts, "decode": ae.model.decode_record(),
            "evaluation": evaluation_of(workdir, ae.step), "latent_statistics": stats}


def readme(card: dict, fmt: str) -> str:
    """The card for people."""
    kind = ("DGAE (diffusion decoder)" if card["decoder"] == "diffusion"
            else "SD-VAE baseline (conv decoder)")
    h, w, c = card["latent_shape"]
    stats = card["latent_statistics"]
    use = ("from dgae_jax import api\nae = api.load(\"THIS_DIRECTORY\")\n"
           "latents = ae.encode(images)  # uint8 (N, H, W, 3)\nimages = ae.decode(latents)"
           if fmt == "dgae" else
           "from diffusers import AutoencoderKL\nvae = AutoencoderKL.from_pretrained("
           "\"THIS_DIRECTORY\")")
    lines = [f"# {card['name']}: {kind}, step {card['step']}", "",
             f"Exported by dgae_jax from `{card['source']}`.", "", "```python", use, "```", "",
             f"- images: {card['image_size']} px for training; any size is processed at its "
             f"own size (sides padded to multiples of {card['size_multiple']}), larger ones "
             "in blended tiles of the training size",
             f"- latent: {h}x{w}x{c} at the training size",
             f"- parameters: encoder {card['parameters']['encoder']:,}, decoder "
             f"{card['parameters']['decoder']:,}",
             f"- decode: {', '.join(f'{k}={v}' for k, v in card['decode'].items())}",
             f"- latent statistics ({stats['num_images']} images of split "
             f"'{stats['split']}'): mean {stats['mean']:.4f}, std {stats['std']:.4f}"]
    evaluation = card["evaluation"]
    if evaluation:
        figures = ", ".join(f"{k} {evaluation[k]:.4g}" for k in ("psnr", "ssim", "lpips", "rfid")
                            if k in evaluation)
        lines.append(f"- evaluation at this step ({evaluation.get('num_images')} images): "
                     f"{figures}")
    else:
        lines.append("- evaluation: the run did not evaluate this step")
    return "\n".join(lines) + "\n"


def export(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Writes export.dir from checkpoint export.step (default the newest intact one)."""
    e = config.export
    ae = api.TrainedAutoencoder.from_run(config, workdir, e.step, field="export.step")
    card = model_card(config, workdir, ae, latent_statistics(config, ae))
    text = readme(card, e.format)
    if e.format == "dgae":
        out = bundle.write(e.dir, config, ae.params, ae.step, card, text)
    else:
        out = diffusers_io.save(e.dir, config, jax.device_get(ae.params),
                                scaling_factor=(config.model.get("scaling_factor")
                                                or 1.0 / card["latent_statistics"]["std"]),
                                extra_files={bundle.CARD: json.dumps(card, indent=1),
                                             "README.md": text})
    return {"dir": str(out), "format": e.format, "step": ae.step,
            "latent_shape": card["latent_shape"], "latent_std": card["latent_statistics"]["std"]}


def check(config: ml_collections.ConfigDict, device_count: int | None) -> None:
    e = config.export
    checks.require(bool(e.dir), "export.dir is required: the directory to create")
    checks.require(not os.path.exists(e.dir),
                   f"export.dir={e.dir!r} already exists; name a new one")
    checks.writable(e.dir, "export.dir")
    checks.one_of(e.format, FORMATS, "export.format")
    checks.require(e.format != "diffusers" or config.model.decoder == "conv",
                   "export.format='diffusers' needs model.decoder='conv': AutoencoderKL has no "
                   "diffusion decoder")
    checks.optional_step(config, "export.step")
    checks.positive(config, "export.stat_images")
    if e.format == "diffusers":
        diffusers_io.check_exportable(config, "export.format")


MODE = Mode(export, AUTOENCODER_TASKS, uses_task=False, one_process=True, check=check)
