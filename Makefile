# The README's commands. Each does its own set-up on a fresh machine:
#   make demo   - set up, build, and generate with APD on the embedded default
#   make test   - set up, build (CUDA kernels too when nvcc is present), run ctest + pytest
# Knobs: PYTHON, VENV, TORCH_SPEC (torch==2.14.1 is the CUDA 13.0 build, from local disk here).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup build dev-build test test-cpp test-py demo bench clean

$(VENV)/.deps-stamp: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q numpy safetensors "transformers>=4.45" tokenizers pytest pytest-timeout pybind11 ninja cmake matplotlib "nvidia-cutlass==4.2.0.0"
	touch $@

setup: $(VENV)/.deps-stamp

# Full build + editable install of the package (console script `apd` included).
build: setup
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import apd_ext; print('apd_ext build:', apd_ext.build_info())"

# Incremental in-place rebuild for development (ninja; serialised with flock so
# that concurrent builds in one tree do not race).
# APD_EXT_CUDA=0 builds the CPU-only variant; each variant keeps its own objects.
dev-build: setup
	flock /tmp/apd_ext_build.lock $(PY) setup.py -q build_ext --inplace --build-temp build/tmp-cuda$${APD_EXT_CUDA:-auto}

test-cpp: setup
	$(VENV)/bin/cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) > /dev/null
	$(VENV)/bin/cmake --build build-cmake
	cd build-cmake && $(abspath $(VENV))/bin/ctest --output-on-failure

test-py: build
	bash scripts/run_pytest.sh $(PY)

test: test-cpp test-py

demo: build
	$(VENV)/bin/apd demo

bench: build
	$(PY) bench/bench_sampling.py
	$(PY) bench/bench_attention.py

clean:
	rm -rf build build-cmake python/apd_ext/*.so
