#!/usr/bin/env bash
# Runs `python -m dgae_jax.main ARGS` on this host, in ./.venv (created and installed once).
# Start the same command on every host of a job (every TPU VM worker, every GPU node):
# jax.distributed.initialize() then finds the others (TPU pods, SLURM, Open MPI), or
# parallel.initialize_distributed passes it JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID (JAX reads only the first; all three must be set).
#   bash launch/run.sh --config=configs/f16.py --workdir=gs://BUCKET/runs/f16
# JAX_EXTRA selects the accelerator build installed with JAX: tpu (default), cuda12, cuda13.
# SETUP_ONLY=1 creates the venv and exits (launch/slurm.sbatch does that once before srun).
# The venv is shared by every host that sees this checkout (a shared filesystem): the first host
# installs it under a lock while the others wait; .venv/.installed marks a finished install, so an
# interrupted install is redone. A venv made by hand (no .venv/.lock) is used as it is. Delete .venv
# to reinstall (e.g. for another JAX_EXTRA).
set -euo pipefail
cd "$(dirname "$0")/.."

install_venv() {
  if [ ! -f .venv/.installed ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e . "jax[${JAX_EXTRA:-tpu}]"
    echo "jax[${JAX_EXTRA:-tpu}]" >.venv/.installed
  fi
}
if [ ! -f .venv/.installed ] && { [ -f .venv/.lock ] || [ ! -x .venv/bin/python ]; }; then
  mkdir -p .venv
  if command -v flock >/dev/null 2>&1; then
    (flock 9; install_venv) 9>.venv/.lock
  else
    install_venv
  fi
fi
if [ "${SETUP_ONLY:-0}" = 1 ]; then
  exit 0
fi
# Compiled steps are cached across restarts (the ImageNet U-Net takes minutes to compile).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/dgae_jax/jit}"
exec .venv/bin/python -m dgae_jax.main "$@"
