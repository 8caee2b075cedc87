#!/usr/bin/env bash
# Runs one suti command on every worker of a Cloud TPU VM pod, with jax.distributed on.
#
#   launch/tpu_pod.sh --tpu=my-v4-64 --zone=us-central2-b \
#       --workdir=/mnt/suti/paper -- --config=configs/paper.py --stages=experts
#
# Everything after `--` goes to `python -m suti.launch` (on every worker, the same command:
# JAX SPMD). The script copies this checkout to each worker (or uses --repo=URL to clone),
# installs it, and starts the launch with config.distributed.initialize=True, so jax finds the
# coordinator and the process ids from the TPU metadata. --dry_run prints the gcloud commands.
# The workdir must be one shared path on every worker: see launch/README.md.
set -euo pipefail

TPU="" ZONE="" PROJECT="" WORKDIR="" REPO="" DRY_RUN=0 REMOTE_DIR="suti"
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; ARGS=("$@"); break ;;
    *) echo "error: unknown argument $1 (launch/tpu_pod.sh --help: see the header)" >&2; exit 2 ;;
  esac
  shift
done
for name in TPU ZONE WORKDIR; do
  if [[ -z "${!name}" ]]; then
    echo "error: --${name,,}=... is required" >&2; exit 2
  fi
done
if [[ ${#ARGS[@]} -eq 0 ]]; then
  echo "error: give the suti.launch flags after --, e.g. -- --config=configs/paper.py" >&2; exit 2
fi

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")
run() {
  if [[ $DRY_RUN -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# 1. The code on every worker: a clone of --repo, or this checkout copied as a tarball.
if [[ -n "$REPO" ]]; then
  SETUP="rm -rf $REMOTE_DIR && git clone -q $REPO $REMOTE_DIR"
else
  TARBALL="$(mktemp -d)/suti.tar.gz"
  run tar -czf "$TARBALL" --exclude=.git --exclude=workdir -C "$(dirname "$0")/.." .
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU:suti.tar.gz" "${COMMON[@]}" --worker=all
  SETUP="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf suti.tar.gz -C $REMOTE_DIR"
fi

# 2. Install (jax[tpu] brings libtpu) and launch the same command on all workers at once.
# (config overrides must follow --config, so distributed.initialize goes last)
LAUNCH="python3 -m suti.launch --workdir=$WORKDIR"
for arg in "${ARGS[@]}"; do LAUNCH+=" $(printf '%q' "$arg")"; done
LAUNCH+=" --config.distributed.initialize=True"
COMMAND="set -e; $SETUP; cd $REMOTE_DIR; python3 -m pip install -q -e . 'jax[tpu]'; $LAUNCH"
run "${GCLOUD[@]}" ssh "$TPU" "${COMMON[@]}" --worker=all --command="$COMMAND"
