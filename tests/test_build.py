"""The build the README promises: `make demo` picks the CPU torch and a CPU-only
build without a GPU and does nothing the second time; `make test` always
recompiles every kernel with the CUDA torch; setup.py never fails for a missing
optional piece (CuTe headers, nvcc) but builds the CPU kernels with one warning.
The Makefile is checked with `make -n` (what it would run), in a scratch copy."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make_n(cwd, *targets, **env):
    # A fresh make, also when pytest itself runs under `make test` (CI): an
    # inherited MAKELEVEL / MAKEFLAGS adds "Entering directory" lines.
    e = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    e.update(env)
    r = subprocess.run(["make", "--no-print-directory", "-n", *targets], cwd=cwd, env=e, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def tree(tmp_path):
    """The files the Makefile's rules read (sources are only timestamps to make)."""
    for f in ("Makefile", "setup.py", "pyproject.toml"):
        shutil.copy(ROOT / f, tmp_path / f)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    (tmp_path / "python" / "apd_ext").mkdir(parents=True)
    (tmp_path / "python" / "apd_ext" / "__init__.py").write_text("")
    return tmp_path


@needs_make
def test_demo_without_gpu_is_a_cpu_build(tree):
    out = _make_n(tree, "demo", HAVE_GPU="0")
    assert 'torch==2.13.0' in out and "torch==2.14.1" not in out
    assert "APD_EXT_CUDA=0" in out and ".venv-cpu/bin/apd demo" in out
    assert "nvidia-cutlass" not in out  # the demo needs no CuTe headers


@needs_make
def test_demo_with_gpu_builds_cuda(tree):
    out = _make_n(tree, "demo", HAVE_GPU="1")
    assert "torch==2.14.1" in out and "APD_EXT_CUDA=auto" in out and ".venv/bin/apd demo" in out


@needs_make
def test_second_demo_does_nothing_until_a_source_changes(tree):
    stamps = [tree / ".venv-cpu" / ".deps-stamp", tree / ".venv-cpu" / ".build-stamp"]
    stamps[0].parent.mkdir()
    later = time.time() + 5
    for s in stamps:
        s.touch()
        os.utime(s, (later, later))
    assert _make_n(tree, "demo", HAVE_GPU="0").strip().splitlines() == [".venv-cpu/bin/apd demo"]
    src = next((tree / "csrc").rglob("*.cu"))
    os.utime(src, (later + 5, later + 5))
    out = _make_n(tree, "demo", HAVE_GPU="0")
    assert "pip install -v --no-build-isolation" in out and "torch==2.13.0" not in out  # rebuild, no reinstall


@needs_make
def test_make_test_always_recompiles_with_the_cuda_torch(tree):
    stamps = [tree / ".venv" / ".deps-stamp", tree / ".venv" / ".build-stamp"]
    stamps[0].parent.mkdir()
    later = time.time() + 5
    for s in stamps:
        s.touch()
        os.utime(s, (later, later))
    out = _make_n(tree, "test-py", APD_EXT_CUDA="1")
    assert "rm -rf build/tmp.venv .venv/.build-stamp" in out  # every object dropped: every .cu compiled
    assert "APD_EXT_CUDA=${APD_EXT_CUDA:-auto}" in out and "scripts/run_pytest.sh" in out  # .ci/run sets 1
    shutil.rmtree(tree / ".venv")
    assert 'torch==2.14.1' in _make_n(tree, "test-py", HAVE_GPU="0")  # the CUDA torch, even without a GPU


def _setup_py(env: dict, pre: str = "") -> subprocess.CompletedProcess:
    """`python setup.py --name` (runs every build decision, compiles nothing)."""
    code = pre + "import sys, runpy; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py', run_name='__main__')"
    e = {k: v for k, v in os.environ.items() if k not in ("APD_EXT_CUDA", "CUDA_HOME")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=300)


def test_missing_nvcc_gives_a_cpu_build_with_one_warning():
    r = _setup_py({"CUDA_HOME": "/nonexistent-cuda"})
    assert r.returncode == 0 and r.stdout.strip().endswith("apd-ext"), r.stderr
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning: apd-ext")]
    if torch.version.cuda is None:
        assert warnings == []  # no CUDA anywhere: nothing is missing
    else:
        assert len(warnings) == 1 and "nvcc was not found" in warnings[0], r.stderr


@pytest.mark.skipif(torch.version.cuda is None or not os.path.isfile("/usr/local/cuda/bin/nvcc"),
                    reason="needs the CUDA torch and nvcc")
def test_cuda_build_without_cutlass_fails_clearly():
    """The CUDA attention kernel is written with CuTe: a CUDA build without the
    nvidia-cutlass headers stops and names the wheel, rather than dropping the kernel."""
    block = "import sys; sys.modules['cutlass_library'] = None\n"  # import fails as if not installed
    r = _setup_py({"APD_EXT_CUDA": "1", "CUDA_HOME": "/usr/local/cuda"}, pre=block)
    assert r.returncode != 0 and "pip install nvidia-cutlass==4.2.0.0" in r.stderr, r.stderr


def test_cpu_build_does_not_need_cutlass():
    block = "import sys; sys.modules['cutlass_library'] = None\n"
    r = _setup_py({"APD_EXT_CUDA": "0"}, pre=block)
    assert r.returncode == 0 and r.stdout.strip().endswith("apd-ext"), r.stderr
    assert "cutlass" not in r.stderr.lower()
