#!/usr/bin/env bash
# Runs dgae_jax on Cloud TPU: asks for capacity through a queued resource (one slice, or
# NODE_COUNT slices for multislice), copies this checkout to every worker of every slice, then
# starts launch/run.sh on all of them at once with the same arguments (any --mode).
#   NAME=dgae ZONE=us-east5-a ACCELERATOR=v5p-32 RUNTIME=v2-alpha-tpuv5 BUCKET=gs://my-bucket \
#   bash launch/tpu_pod.sh --config=configs/f16.py
# Walkthrough (train, cache latents, DiT, multislice, resume): launch/README.md.
#
# Required: NAME (queued resource NAME-qr; its slice is NAME, or NAME-0..NAME-<N-1>), ZONE,
#   ACCELERATOR (e.g. v5p-32), RUNTIME (TPU software version, e.g. v2-alpha-tpuv5), BUCKET.
# Optional:
#   NODE_COUNT=N            N slices (multislice, default 1); adds --config.mesh.dcn_data=N
#                           (data parallelism across slices) unless an argument sets it.
#   SPOT=1 | RESERVED=1     Spot or reserved capacity (not both); default on-demand.
#   VALID_UNTIL_DURATION=6h give up on the request if it is not provisioned in time.
#   PROJECT                 Google Cloud project (default: gcloud's configured project).
#   TPU_FLAGS               extra flags for `queued-resources create` (split on spaces).
#   WORKDIR                 run directory when no --workdir argument is given; default
#                           $BUCKET/runs/$NAME-<config name>, e.g. gs://b/runs/dgae-f16, so the
#                           cache job (same config) finds the autoencoder it encodes with and a
#                           rerun resumes from the latest checkpoint.
#   TFDS_DATA_DIR           default $BUCKET/tfds (ImageNet as TFDS ArrayRecord, docs/training.md).
#   INCEPTION_WEIGHTS       the converted FID network (docs/evaluation.md) on this machine,
#                           default $DGAE_JAX_INCEPTION_WEIGHTS or
#                           ~/.cache/dgae_jax/inception-2015-12-05.npz; copied to the workers
#                           with the code (rFID / gFID during training need it there).
#   DRY_RUN=1               print the commands (shell-quoted, one per line) and run nothing.
# An existing NAME-qr is reused (rerun after a preemption, or to run the next job on the same
# slices). This script waits for the run to finish: start it inside tmux/screen, since closing
# the ssh sessions stops the workers. Delete the slices when done:
#   gcloud compute tpus queued-resources delete NAME-qr --zone=ZONE --force
set -euo pipefail

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}
is_on() { # is_on VAR: true when VAR is set to anything but "", 0, false or no
  case "${!1:-0}" in 0 | "" | false | no) return 1 ;; *) return 0 ;; esac
}

for var in NAME ZONE ACCELERATOR RUNTIME BUCKET; do
  [ -n "${!var:-}" ] || die "$var is not set (required: NAME ZONE ACCELERATOR RUNTIME BUCKET)"
done
NODE_COUNT="${NODE_COUNT:-1}"
[[ "$NODE_COUNT" =~ ^[1-9][0-9]*$ ]] || die "NODE_COUNT must be a positive integer, not '$NODE_COUNT'"
if is_on SPOT && is_on RESERVED; then
  die "SPOT=1 and RESERVED=1 exclude each other: choose one"
fi
QR="$NAME-qr"
cd "$(dirname "$0")/.."

# ------------------------------------------------------------------------- the run's arguments
args=(${1+"$@"})
workdir="" config="" has_dcn=0
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --workdir=*) workdir="${args[i]#--workdir=}" ;;
    --workdir) workdir="${args[i + 1]:-}" ;;
    --config=*) config="${args[i]#--config=}" ;;
    --config) config="${args[i + 1]:-}" ;;
    --config.mesh.dcn_data | --config.mesh.dcn_data=*) has_dcn=1 ;;
  esac
done
if [ -z "$workdir" ]; then
  cfg_name="${config##*/}"
  cfg_name="${cfg_name/.py/}"
  cfg_name="${cfg_name//[^A-Za-z0-9._-]/-}"
  workdir="${WORKDIR:-$BUCKET/runs/$NAME-${cfg_name:-run}}"
  args=("--workdir=$workdir" ${args[@]+"${args[@]}"})
fi
if [ "$NODE_COUNT" -gt 1 ] && [ "$has_dcn" = 0 ]; then
  args+=("--config.mesh.dcn_data=$NODE_COUNT")
fi

# What the login shell of every worker runs: each argument quoted with printf %q, so values with
# spaces or parentheses (--config.sample.classes='(207, 360)') arrive unchanged.
weights="${INCEPTION_WEIGHTS:-${DGAE_JAX_INCEPTION_WEIGHTS:-$HOME/.cache/dgae_jax/inception-2015-12-05.npz}}"
remote="mkdir -p dgae_jax && tar -xzf dgae_jax.tgz -C dgae_jax && cd dgae_jax && env "
if [ -f "$weights" ]; then # the copy next to the code; $PWD expands on the worker
  remote+="DGAE_JAX_INCEPTION_WEIGHTS=\"\$PWD\"/$(printf '%q' "${weights##*/}") "
fi
remote+="$(printf '%q ' "TFDS_DATA_DIR=${TFDS_DATA_DIR:-$BUCKET/tfds}" bash launch/run.sh ${args[@]+"${args[@]}"})"
remote="${remote% }"

if [ "$NODE_COUNT" = 1 ]; then
  nodes=("$NAME")
  topology=(--node-id="$NAME")
else
  nodes=()
  for ((i = 0; i < NODE_COUNT; i++)); do nodes+=("$NAME-$i"); done
  topology=(--node-count="$NODE_COUNT" --node-prefix="$NAME")
fi
capacity=()
if is_on SPOT; then capacity+=(--spot); fi
if is_on RESERVED; then capacity+=(--reserved); fi
if [ -n "${VALID_UNTIL_DURATION:-}" ]; then
  capacity+=(--valid-until-duration="$VALID_UNTIL_DURATION")
fi
read -ra extra_flags <<<"${TPU_FLAGS:-}"
common=(--zone="$ZONE")
if [ -n "${PROJECT:-}" ]; then common+=(--project="$PROJECT"); fi
tarball="${TMPDIR:-/tmp}/$NAME-dgae_jax.tgz"
export COPYFILE_DISABLE=1 # macOS tar: no ._* files in the archive

# ------------------------------------------------------------------------------- helpers
quote() { # one argument as the shell reads it back: bare when safe, else single-quoted
  local a="$1"
  if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$a"
  elif [[ "$a" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then # --flag='value'
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/\'\\\'\'}"
  else
    printf "'%s'" "${a//\'/\'\\\'\'}"
  fi
}
show() { # prints a command line that can be pasted into a shell
  local line="" a
  for a in "$@"; do line+="$(quote "$a") "; done
  printf '%s\n' "${line% }"
}
dry() { is_on DRY_RUN; }
gc() { # runs (or, with DRY_RUN=1, prints) a gcloud command
  if dry; then show gcloud "$@"; else gcloud "$@"; fi
}

if dry; then
  echo "# DRY_RUN=1: nothing is run; these are the commands, in order."
  echo "# Skipped when $QR already exists (it is then reused):"
fi

# --------------------------------------------------------------------- capacity, then code
create=(compute tpus queued-resources create "$QR" "${common[@]}" "${topology[@]}"
  --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" ${capacity[@]+"${capacity[@]}"}
  ${extra_flags[@]+"${extra_flags[@]}"})
describe=(compute tpus queued-resources describe "$QR" "${common[@]}")
if dry; then
  gc "${create[@]}"
  echo "# Then wait until this prints ACTIVE:"
  gc "${describe[@]}" --format='value(state.state)'
elif gcloud "${describe[@]}" >/dev/null 2>&1; then
  echo "reusing the existing queued resource $QR" >&2
else
  gc "${create[@]}"
fi
if ! dry; then
  while :; do
    state="$(gcloud "${describe[@]}" --format='value(state.state)')" || state=""
    case "$state" in
      ACTIVE) break ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        die "$QR is $state: delete it (gcloud compute tpus queued-resources delete $QR --zone=$ZONE --force) and rerun" ;;
    esac
    echo "waiting for $QR to become ACTIVE (now ${state:-unknown})..." >&2
    sleep "${POLL_SECONDS:-60}"
  done
fi

files=(pyproject.toml README.md dgae_jax configs launch)
if [ -f "$weights" ]; then
  files+=(-C "$(dirname "$weights")" "${weights##*/}")
else
  echo "# note: no FID Inception weights at $weights: the workers cannot compute rFID/gFID (docs/evaluation.md converts them; or --config.eval.rfid=False)" >&2
fi
if dry; then
  show tar -czf "$tarball" --exclude=__pycache__ "${files[@]}"
else
  tar -czf "$tarball" --exclude=__pycache__ "${files[@]}"
fi
for node in "${nodes[@]}"; do
  gc compute tpus tpu-vm scp "$tarball" "$node:dgae_jax.tgz" "${common[@]}" --worker=all
done

# ------------------------------------------------------------- start every worker at once
if dry; then
  echo "# workdir: $workdir"
  echo "# Every worker of every slice then runs this (one ssh per slice, all at once):"
  echo "# $remote"
  for node in "${nodes[@]}"; do
    echo "$(show gcloud compute tpus tpu-vm ssh "$node" "${common[@]}" --worker=all --command="$remote") &"
  done
  echo "wait"
  exit 0
fi
echo "workdir: $workdir" >&2
pids=()
for node in "${nodes[@]}"; do
  gcloud compute tpus tpu-vm ssh "$node" "${common[@]}" --worker=all --command="$remote" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
