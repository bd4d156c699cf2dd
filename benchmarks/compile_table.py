"""Compiles the paper configs' train steps for TPU slices (`--mode=compile`) and prints the table
of docs/tpu.md: fits, per-chip memory, FLOPs, the roofline bound.

Each (config, topology, overrides) is one `--mode=compile` process (XLA:TPU's compiler needs up
to ~15 GB of host memory for a DGAE-B step; a fresh process returns it) whose JSON record is
appended to --out; runs already there are skipped, so the job resumes where it stopped.

    python benchmarks/compile_table.py --out=compile.jsonl              # every row, default
    python benchmarks/compile_table.py --out=compile.jsonl --rows=f16 --topologies=v5e-16 \
        --set model.unet.remat=blocks                                   # a setting that fits
    python benchmarks/compile_table.py --out=compile.jsonl --table      # print the table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROWS = {  # name: (config, what it is)
    "f8": ("configs/f8.py", "DGAE-B f8c4"),
    "f16": ("configs/f16.py", "DGAE-B f16c16"),
    "f16c8": ("configs/f16.py:c=8", "DGAE-B f16c8"),
    "f32": ("configs/f32.py", "DGAE-B f32c64"),
    "f16-M": ("configs/f16.py:size=M", "DGAE-M f16c16"),
    "f16-L": ("configs/f16.py:size=L", "DGAE-L f16c16"),
    "dit-c16": ("configs/ldm_f16.py", "DiT-XL/1, 16x16x16 latents"),
    "dit-c8": ("configs/ldm_f16.py:c=8", "DiT-XL/1, 16x16x8 latents"),
}
TOPOLOGIES = ("v5e-16", "v5p-32", "v6e-16")


def key(row: str, topology: str, overrides: dict) -> str:
    return json.dumps([row, topology, overrides], sort_keys=True)


def done(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    return {key(e["row"], e["topology"], e["overrides"]): e for e in entries}


def compile_one(row: str, topology: str, overrides: dict, executables: str) -> dict:
    cmd = [sys.executable, "-m", "dgae_jax.main", f"--config={ROWS[row][0]}", "--mode=compile",
           f"--config.compile.topology={topology}",
           f"--config.compile.executables={executables}",
           *(f"--config.{k}={v}" for k, v in overrides.items())]
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return {"row": row, "topology": topology, "overrides": overrides, "command": cmd[1:],
            "wall_s": time.time() - start,
            "record": json.loads(out.stdout.strip().splitlines()[-1])}


def order(entry: dict) -> tuple:
    """Rows by config, then slice, then setting (default first)."""
    topology = entry["topology"]
    return (list(ROWS).index(entry["row"]),
            TOPOLOGIES.index(topology) if topology in TOPOLOGIES else len(TOPOLOGIES), topology,
            len(entry["overrides"]), json.dumps(entry["overrides"], sort_keys=True))


def table(entries: list[dict]) -> str:
    """The docs table: one row per compiled (config, slice, setting), in `order`."""
    lines = ["| config | slice | setting | batch / chip | fits | GiB per chip (of HBM) | "
             "TFLOP / step | compute ms | GB accessed / chip | memory ms | roofline MFU | "
             "compile s |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in sorted(entries, key=order):
        r = e["record"]
        step = r["executables"]["train_step"]
        setting = ", ".join(f"{k}={v}" for k, v in e["overrides"].items()) or "default"
        per_chip = r["batch_size"] // r["chips"]
        if "needed_gib" in step:  # compiled (it may still not fit)
            memory = f"{step['needed_gib']:.1f} ({r['hbm_gib']:.0f})"
            cost = (f"{step['flops_per_chip'] * r['chips'] / 1e12:.0f} | "
                    f"{step['compute_ms']:.0f} | {step['bytes_per_chip'] / 1e9:.0f} | "
                    f"{step['memory_ms']:.0f} | {100 * step['mfu_bound']:.0f}%")
        else:  # refused by XLA: its figures for the temporaries
            memory = (f"temporaries {step['temp_gib']:.1f} (of {step['available_gib']:.1f} "
                      "available)")
            cost = "| | | |"
        lines.append(f"| {ROWS[e['row']][1]} | {r['topology']} | {setting} | {per_chip} | "
                     f"{'yes' if step['fits'] else 'no'} | {memory} | {cost} | "
                     f"{step['compile_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON lines, one per compiled run (appended)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    p.add_argument("--topologies", default=",".join(TOPOLOGIES))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config override for every run (repeatable)")
    p.add_argument("--executables", default="train_step")
    p.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = p.parse_args()
    if args.table:
        print(table(list(done(args.out).values())))
        return
    overrides = dict(s.split("=", 1) for s in args.set)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        raise SystemExit(f"--rows: {', '.join(sorted(unknown))} not in {', '.join(ROWS)}")
    for row in args.rows.split(","):
        for topology in args.topologies.split(","):
            if key(row, topology, overrides) in done(args.out):
                continue
            entry = compile_one(row, topology, overrides, args.executables)
            step = entry["record"]["executables"]["train_step"]
            print(f"{row} on {topology} {overrides or ''}: fits={step['fits']}, "
                  f"{entry['wall_s']:.0f} s", flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(entry) + "\n")


if __name__ == "__main__":
    main()
