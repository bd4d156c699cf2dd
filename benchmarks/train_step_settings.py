"""Times the train step under each performance setting and prints one table (MFU, images/s).

Each setting is one `--mode=benchmark` run in its own process (so XLA flags apply), on the
paper's f16 DGAE-B at 256 px in bfloat16 by default; the last table row is the decode
throughput at the same size. On an accelerator, run it as one prepared job:

    python benchmarks/train_step_settings.py                      # every setting below
    python benchmarks/train_step_settings.py --settings=base,cudnn --batch=32
    python benchmarks/train_step_settings.py --config=configs/f16.py:demo --batch=8  # CPU check

The settings are TPU-friendly except 'cudnn' (NVIDIA only); the xla_gpu_* flags are parsed but
ignored elsewhere. MFU is against the dense bf16 peak of the device (dgae_jax/chips.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true "
             "--xla_gpu_enable_triton_gemm=false")

# name: (config overrides, XLA flags added, what it tries)
SETTINGS = {
    "base": ({}, "", "the configs as they are"),
    "cudnn": ({"model.unet.attention": "cudnn"}, "", "cuDNN fused attention in the U-Net"),
    "remat_attention": ({"model.unet.remat": "attention"}, "",
                        "recompute attention (frees the 256x256 scores at 16 px)"),
    "remat_blocks_2x": ({"model.unet.remat": "blocks", "batch": 2}, "",
                        "recompute every block, at twice the batch"),
    "gpu_flags": ({}, GPU_FLAGS, "latency-hiding scheduler, cuBLAS instead of Triton GEMMs"),
    "decode": ({"components": "encoder,unet,decode_1,decode_4,decode_25,conv_decoder"}, "",
               "inference components at the same batch"),
}


def run_setting(name: str, config: str, batch: int, steps: int, timeout: int) -> dict:
    overrides, flags, _ = SETTINGS[name]
    overrides = dict(overrides)
    batch *= overrides.pop("batch", 1)
    components = overrides.pop("components", "train_step")
    args = [sys.executable, "-m", "dgae_jax.main", f"--config={config}", "--mode=benchmark",
            f"--config.batch_size={batch}", f"--config.benchmark.steps={steps}",
            f"--config.benchmark.components={components}"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ)
    if flags:  # every backend parses XLA's flags; only XLA:GPU acts on xla_gpu_*
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    start = time.time()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"setting": name, "batch": batch, "error": tail[0][:200]}
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"setting": name, "batch": batch, "wall_s": time.time() - start, **record}


def table(rows: list[dict]) -> str:
    lines = ["| setting | component | batch | ms | images/s | TFLOP/s/device | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['setting']} | failed: {row['error']} |  |  |  |  |  |  |")
            continue
        for comp, c in row["components"].items():
            mfu = f"{100 * c['mfu']:.1f}%" if c.get("mfu") is not None else "-"
            peak = f"{c['peak_memory_gib']:.1f}" if c.get("peak_memory_gib") else "-"
            lines.append(f"| {row['setting']} | {comp} | {row['inference_batch_size']} | "
                         f"{c['time_ms']:.1f} | {c['images_per_sec']:.2f} | "
                         f"{c['tflops_per_sec_per_device']:.2f} | {mfu} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/f16.py")
    parser.add_argument("--batch", type=int, default=32, help="global batch of each setting")
    parser.add_argument("--steps", type=int, default=10, help="timed calls per component")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, from: {', '.join(SETTINGS)}")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per setting")
    args = parser.parse_args()
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        sys.exit(f"--settings: unknown {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    rows = []
    for name in names:
        rows.append(run_setting(name, args.config, args.batch, args.steps, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    kind = next((r["device_kind"] for r in rows if "device_kind" in r), "?")
    print(f"\n{args.config} on {kind}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
