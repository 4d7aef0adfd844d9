#!/bin/bash
# Lumen on a Cloud TPU pod slice: the same command on every host of the slice, one JAX process per host.
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a scripts/launch_tpu_pod.sh --config=configs/lm/arith.py:size=base \
#       --workdir=/mnt/shared/runs/base_fsdp --config.mesh.data=-1 --config.mesh.fsdp=8
#
# jax.distributed.initialize() (scripts.launch --distributed) finds the coordinator and process ids from the TPU
# metadata. The repository and its .venv must exist at $LUMEN_DIR on every host (e.g. a prior
# `gcloud ... ssh --worker=all --command="git clone ... && make install"`), and --workdir must be a filesystem every
# host sees (Filestore/NFS or a gcsfuse mount). A pre-empted (SIGTERM) slice checkpoints and exits 0; rerun to resume.
# Not run in this repository's CI (no TPUs there): the same code path is tested with 2 CPU processes on localhost.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
LUMEN_DIR="${LUMEN_DIR:-~/lumen}"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd $LUMEN_DIR && .venv/bin/python -m scripts.launch --distributed$args"
