#!/usr/bin/env bash
# `slm train` on every worker of a Cloud TPU VM slice, as one multi-controller job.
#
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a [PROJECT=my-project] \
#     launch/tpu_pod.sh -- --config configs/pretrain/7b.yaml checkpoint.dir=gs://BUCKET/slm-7b
#
# 1. packs the tracked files of this checkout (local edits included, untracked files not),
# 2. copies the archive to all workers and installs it there with the `tpu` extra (libtpu),
# 3. starts `slm train ARGS` on all workers at once with SLM_DISTRIBUTED=auto: JAX reads the
#    coordinator, process count and process ids from the TPU VM metadata.
# Every worker needs the same data and a checkpoint.dir they all reach (a gs:// bucket).
# Output of all workers is interleaved here; process 0 draws the progress bar. Stopping the
# slice (preemption) sends SIGTERM: the workers agree on a step, save it and exit; running this
# script again resumes from that checkpoint. Set SKIP_INSTALL=1 to reuse an installed copy.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
: "${ZONE:?set ZONE to the slice zone, e.g. us-east5-a}"
if [[ "${1:-}" == "--" ]]; then shift; fi
if (($# == 0)); then
  echo "tpu_pod.sh: give slm train's arguments after --, e.g. -- --config configs/pretrain/7b.yaml" >&2
  exit 2
fi

gcloud_args=(--zone "$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then gcloud_args+=(--project "$PROJECT"); fi
repo=$(cd "$(dirname "$0")/.." && pwd)
remote_dir=slm

if [[ -z "${SKIP_INSTALL:-}" ]]; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  archive=$scratch/slm.tar.gz
  git -C "$repo" ls-files -z | tar --null -czf "$archive" -C "$repo" -T -
  echo "tpu_pod: copying $(du -h "$archive" | cut -f1) to every worker of $TPU_NAME"
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:slm.tar.gz" "${gcloud_args[@]}"
  install="rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf slm.tar.gz -C $remote_dir"
  install+=" && python3 -m pip install -q -e './${remote_dir}[tpu]'"
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --command "set -e; $install"
fi

printf -v train_args '%q ' "$@"
echo "tpu_pod: slm train $train_args on every worker of $TPU_NAME"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" \
  --command "cd $remote_dir && SLM_DISTRIBUTED=auto python3 -m slm.cli train $train_args"
