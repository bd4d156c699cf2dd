#!/usr/bin/env bash
# Runs `python -m dgae_jax.main ARGS` on this host, in ./.venv (created and installed once).
# Start the same command on every host of a job (every TPU VM worker, every GPU node):
# jax.distributed.initialize() then finds the others (TPU pods, SLURM, Open MPI, or the
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables).
#   bash launch/run.sh --config=configs/f16.py --workdir=gs://BUCKET/runs/f16
# JAX_EXTRA selects the accelerator build installed with JAX: tpu (default), cuda12, cuda13.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e . "jax[${JAX_EXTRA:-tpu}]"
fi
# Compiled steps are cached across restarts (the ImageNet U-Net takes minutes to compile).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/dgae_jax/jit}"
exec .venv/bin/python -m dgae_jax.main "$@"
