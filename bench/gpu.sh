#!/usr/bin/env bash
# The one-call GPU benchmark of issue 7 (deliverable 8): softmax flash attention (attnx pallas_gpu vs jax.nn cudnn
# and xla, and tokamax when installed), block-sparse, Lightning linear scan and 2-D neighbourhood attention; see the
# docstring of bench/gpu_bench.py for the settings and the FLOP convention. Finishes in under 5 minutes on one GPU:
# the cases share a 270 s budget (--budget) and whatever does not fit is skipped and counted.
#
#   bash bench/gpu.sh                      # tables on stdout; gpu_bench.{json,md} and the log in $OUT or bench/out/gpu
#   bash bench/gpu.sh --budget 500         # any further argument goes to python -m bench.gpu_bench
#
# Needs jax with CUDA only (attnx imports neither flax, grain nor gin). Wheels carried in .whl/ (e.g. tokamax's,
# see the device README) are installed into /tmp/site first. The correctness check of the GPU-only paths against
# the reference is a separate script: python3 bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out/gpu}"
mkdir -p "$out"
python="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Allocate on demand: memory_stats() then reports each case's own peak, and a case that needs more than is free
# fails alone (recorded as "failed") instead of the whole run.
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader \
  | tee "$out/nvidia_smi.txt"
# SIGINT after 290 s lets the benchmark write what it measured; SIGKILL 10 s later if it cannot.
timeout -s INT -k 10 290 "$python" -m bench.gpu_bench --out "$out" "$@" 2>&1 | tee "$out/gpu_bench.log"
