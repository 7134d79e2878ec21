#!/usr/bin/env bash
# The accelerator benchmarks in one go, sized for one GPU and under 8 minutes: a ~1B bfloat16
# train step (MFU against the measured matmul peak and, on H100/H200, the datasheet's 989
# TFLOP/s), decoding at batch 1 and 16 (fraction of the HBM bandwidth measured on the device),
# and each strategy's time to first audio. Each benchmark writes OUT/<name>.json; `slm bench
# report` renders them into OUT/BENCHMARKS.md, naming the device.
#
#   launch/gpu_bench.sh [OUT]            # default OUT: benchmarks/gpu
#   SLM_BENCH_TINY=1 launch/gpu_bench.sh /tmp/out   # the same commands on a tiny model (CPU)
#
# Environment: PYTHON (default python3) runs `-m slm.cli`; SLM_BENCH_TINY=1 swaps the 1B
# config for configs/tiny/synthetic.yaml and skips the per-strategy models, so a CPU test can
# run every step of the script.
set -euo pipefail

out=${1:-benchmarks/gpu}
python=${PYTHON:-python3}
mkdir -p "$out"

if [[ "${SLM_BENCH_TINY:-0}" == 1 ]]; then
  config=configs/tiny/synthetic.yaml
  train=(--steps 1 --rounds 1)
  decode=(--rounds 1 --prompt-len 8 --new-tokens 8 --strategies-config "")
else
  # one device: 8 rows of 2048 tokens, bfloat16 over float32 master weights (the config's)
  config=configs/pretrain/1b.yaml
  train=(--steps 5 --rounds 2 data.batch_size=8 data.seq_len=2048)
  decode=(--rounds 3 --prompt-len 32 --new-tokens 128)
fi

slm() { "$python" -m slm.cli "$@"; }

slm bench train --config "$config" "${train[@]}" --json | tail -n 1 > "$out/train.json"
slm bench decode --config "$config" --batch 1 16 "${decode[@]}" --json | tail -n 1 > "$out/decode.json"
slm bench report "$out/train.json" "$out/decode.json" --out "$out/BENCHMARKS.md"
