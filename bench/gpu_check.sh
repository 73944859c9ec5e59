#!/usr/bin/env bash
# One device run: build from source for sm_90a, run every CUDA test, run the
# benchmarks, print one table. Meant for the H200 lent by the device tool:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Needs the nvidia-cutlass wheel carried in .whl/ (see README "GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export APD_CUDA_ARCHS="${APD_CUDA_ARCHS:-90a}" APD_EXT_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" APD_NVCC_THREADS=4
T0=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - T0 )) s)"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/python
else
  export PYTHONPATH=$PWD/python
fi

stage "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

stage "build"
python3 setup.py -q build_ext --inplace 2>&1 | tail -20 | tee "$OUT/build.log"
python3 -c "import apd_ext" || { echo "BUILD FAILED"; exit 1; }

stage "cuda tests"
timeout 150 python3 -m pytest -q -x -ra -m cuda tests --ignore=tests/test_attention_cuda.py 2>&1 | tail -40 | tee "$OUT/tests.log"

# window_attention, both CUDA kernels (APD_ATTN_IMPL=simple | mma): its own
# process and no -x, so that a fault in the unverified mma kernel neither hides
# the simple kernel's results nor poisons the other tests' CUDA context.
stage "attention tests"
timeout 90 python3 -m pytest -q -rfE -m cuda tests/test_attention_cuda.py -k "not mma" 2>&1 | tail -40 | tee "$OUT/attention_tests.log"
timeout 60 python3 -m pytest -q -rfE -m cuda tests/test_attention_cuda.py -k mma 2>&1 | tail -40 | tee -a "$OUT/attention_tests.log"

stage "benchmarks"
# The whole script must end within ~8 minutes (the device lease is 15 minutes
# for all tries together): each benchmark gets its cap or what is left of the
# budget, and one that cannot start in time is listed as skipped.
BUDGET="${APD_GPU_CHECK_BUDGET:-450}"
: > "$OUT/table.md"
run_bench() {  # run_bench CAP_S LABEL CMD...
  local cap=$1 label=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 20 ]; then echo "- $label: skipped (time budget)" | tee -a "$OUT/table.md"; return; fi
  [ "$cap" -gt "$left" ] && cap=$left
  timeout "$cap" "$@" --device cuda --markdown "$OUT/table.md" 2>&1 | tail -30
  [ "${PIPESTATUS[0]}" -eq 124 ] && echo "- $label: timed out after ${cap} s" | tee -a "$OUT/table.md"
}
# Batch invariance on the device (docs/SEMANTICS.md "Batch invariance"): a
# request alone vs inside mixed batches, kernels and the tiny pair's logits
# and tokens; prints bit-identical yes / NO per check (the GEMMs are the part
# not invariant by construction).
run_bench 60 batch-invariance python3 bench/batch_invariance_check.py
run_bench 60 sampling python3 bench/bench_sampling.py
run_bench 90 attention python3 bench/bench_attention.py
# The tensor-core attention kernel, same shapes (the table above is the default kernel).
echo "**window_attention with APD_ATTN_IMPL=mma**" >> "$OUT/table.md"
APD_ATTN_IMPL=mma run_bench 60 attention-mma python3 bench/bench_attention.py
run_bench 60 models python3 bench/bench_models.py
run_bench 60 e2e python3 bench/bench_e2e.py
run_bench 60 batch python3 bench/bench_batch.py

stage "table"
cat "$OUT/table.md"
echo "total $(( $(date +%s) - T0 )) s"
