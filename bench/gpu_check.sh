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
python3 -m pytest -q -x -ra -m cuda tests --ignore=tests/test_attention_cuda.py 2>&1 | tail -40 | tee "$OUT/tests.log"

# window_attention, both CUDA kernels (APD_ATTN_IMPL=simple | mma): its own
# process and no -x, so that a fault in the unverified mma kernel neither hides
# the simple kernel's results nor poisons the other tests' CUDA context.
stage "attention tests"
python3 -m pytest -q -rfE -m cuda tests/test_attention_cuda.py -k "not mma" 2>&1 | tail -40 | tee "$OUT/attention_tests.log"
python3 -m pytest -q -rfE -m cuda tests/test_attention_cuda.py -k mma 2>&1 | tail -40 | tee -a "$OUT/attention_tests.log"

stage "benchmarks"
: > "$OUT/table.md"
for b in bench/bench_sampling.py bench/bench_attention.py bench/bench_models.py bench/bench_e2e.py bench/bench_batch.py; do
  [ -f "$b" ] || continue
  timeout 120 python3 "$b" --device cuda --markdown "$OUT/table.md" 2>&1 | tail -30
done
# The tensor-core attention kernel, same shapes (the table above is the default kernel).
if [ -f bench/bench_attention.py ]; then
  echo "**window_attention with APD_ATTN_IMPL=mma**" >> "$OUT/table.md"
  APD_ATTN_IMPL=mma timeout 90 python3 bench/bench_attention.py --device cuda --markdown "$OUT/table.md" 2>&1 | tail -30
fi

stage "table"
cat "$OUT/table.md"
echo "total $(( $(date +%s) - T0 )) s"
