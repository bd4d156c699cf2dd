#!/usr/bin/env bash
# Trains on a Cloud TPU pod slice: asks for capacity through a queued resource, copies this
# checkout to every worker, then starts launch/run.sh on all of them with the same arguments.
#   NAME=dgae ZONE=us-central2-b ACCELERATOR=v5p-32 RUNTIME=v2-alpha-tpuv5 \
#   BUCKET=gs://my-bucket bash launch/tpu_pod.sh --config=configs/f16.py
# Data: prepare ImageNet once as TFDS ArrayRecord under $BUCKET/tfds (README); checkpoints,
# TensorBoard files, images and eval JSON go to $BUCKET/runs/<config>-<date>. Rerunning the last
# step with the same --workdir resumes from the latest checkpoint. Delete the slice when done:
#   gcloud compute tpus queued-resources delete $NAME-qr --zone=$ZONE --force
set -euo pipefail
: "${NAME:?}" "${ZONE:?}" "${ACCELERATOR:?}" "${RUNTIME:?}" "${BUCKET:?}"
WORKDIR="${WORKDIR:-$BUCKET/runs/$NAME-$(date +%m%d-%H%M)}"

if ! gcloud compute tpus queued-resources describe "$NAME-qr" --zone="$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus queued-resources create "$NAME-qr" --node-id="$NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" ${TPU_FLAGS:-}
fi
until gcloud compute tpus queued-resources describe "$NAME-qr" --zone="$ZONE" \
    --format='value(state.state)' | grep -q ACTIVE; do
  echo "waiting for $NAME-qr to become ACTIVE..."; sleep 60
done

cd "$(dirname "$0")/.."
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all \
  pyproject.toml README.md dgae_jax configs launch "$NAME":dgae_jax/
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command \
  "cd dgae_jax && TFDS_DATA_DIR=$BUCKET/tfds bash launch/run.sh --workdir=$WORKDIR $*"
