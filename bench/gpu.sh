#!/usr/bin/env bash
# One prepared device check for a lent GPU machine (see the device tool's README): correctness of the GPU-only
# implementations against the reference, then the attention benchmark in bf16 against jax.nn (xla and cudnn).
# The machine has jax but neither grain nor gin; attnx itself needs only jax. Output goes to $OUT (or bench/out).
# Usage (device tool):  bash bench/gpu.sh    (timeout_s ~ 420 leaves room for one rerun in a 15-minute lease)
set -uo pipefail
out="${OUT:-bench/out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
timeout 150 python3 bench/gpu_check.py 2>&1 | tee "$out/gpu_check.log"
timeout 240 python3 -m bench.attention --T 1024 4096 16384 --causal 1 0 --dtype bfloat16 --bf16-max-T 16384 \
  --peer-max-T 16384 --impl jax_nn chunked attnx_default --repeats 5 \
  --out "$out/attention_gpu.json" --plot "$out/attention_gpu.png" 2>&1 | tee "$out/attention_gpu.log"
