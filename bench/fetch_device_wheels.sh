#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks (it has no network) into
# .whl/, for Python 3.12 on x86_64; bench/gpu_check.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "nvidia-cutlass==4.2.0.0"
ls -la .whl
