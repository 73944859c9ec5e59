"""The build the README promises: `make demo` picks the CPU torch and a CPU-only
build without a GPU and does nothing the second time; `make test` always
recompiles every kernel with the CUDA torch; setup.py never fails for a missing
optional piece (CuTe headers, nvcc) but builds the CPU kernels with one warning.
The Makefile is checked with `make -n` (what it would run), in a scratch copy."""
import importlib.util
import os
import re
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
    shutil.copy(ROOT / "python" / "apd_ext" / "_build_info.py", tmp_path / "python" / "apd_ext")  # setup.py's rule
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
    lines = _make_n(tree, "demo", HAVE_GPU="0").strip().splitlines()
    # the demo itself, then only the closing hint (how to run apd): nothing built or installed
    assert lines[0] == ".venv-cpu/bin/apd demo" and all(line.startswith("echo") for line in lines[1:]), lines
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


# ---------------------------------------------------------------------------
# The CUDA architecture list (issue 24): one rule, in _build_info.py (setup.py)
# and cmake/ApdCudaArchs.cmake
# ---------------------------------------------------------------------------

from apd_ext import _build_info  # noqa: E402
from skips import not_applicable  # noqa: E402

NVCC13 = ["75", "80", "86", "87", "88", "89", "90", "100", "110", "103", "120", "121"]


def test_arch_lists_in_both_spellings():
    parse = _build_info.parse_arch_list
    assert parse("8.0;8.6+PTX;9.0") == {"sass": ["80", "86", "90"], "ptx": ["86"]}
    assert parse("80;86") == parse("8.0 8.6") == parse("sm_80,sm_86") == {"sass": ["80", "86"], "ptx": []}
    assert parse("9.0a; 12.0+PTX") == {"sass": ["90a", "120"], "ptx": ["120"]}
    assert parse("compute_90;100") == {"sass": ["100"], "ptx": ["90"]}
    for bad in ("Ampere", "8.x", ";", "sm_9000"):
        with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST: expected"):
            parse(bad, "TORCH_CUDA_ARCH_LIST")


def test_arch_rule_env_then_visible_gpu_then_default():
    resolve = _build_info.resolve_archs
    both = {"APD_CUDA_ARCHS": "8.6", "TORCH_CUDA_ARCH_LIST": "8.0;9.0"}
    assert resolve(both, [(9, 0)], NVCC13) == ({"sass": ["86"], "ptx": []}, "APD_CUDA_ARCHS")  # APD_ wins
    assert resolve({"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"}, [(8, 6)], NVCC13) == (
        {"sass": ["80", "90"], "ptx": ["90"]}, "TORCH_CUDA_ARCH_LIST")
    assert resolve({"APD_CUDA_ARCHS": " "}, [(8, 9), (8, 6)], NVCC13) == (
        {"sass": ["86", "89"], "ptx": ["89"]}, "the visible GPU")
    default = {"sass": ["80", "86", "89", "90", "100", "120"], "ptx": ["120"]}
    assert resolve({}, [], NVCC13) == (default, "the default list")
    # An older nvcc without sm_100 / sm_120: the four, and the PTX of sm_90 (never 90a).
    old = ["70", "75", "80", "86", "87", "89", "90"]
    assert resolve({}, [], old) == ({"sass": ["80", "86", "89", "90"], "ptx": ["90"]}, "the default list")
    # A GPU newer than this nvcc: the default list (its newest PTX JIT-compiles there).
    assert resolve({}, [(12, 0)], old)[1] == "the default list"
    flags = _build_info.gencode_flags(default)
    # one front end (compute_80) for every SASS arch, the newest PTX on its own
    assert "-gencode=arch=compute_80,code=sm_86" in flags and "-gencode=arch=compute_120,code=compute_120" in flags
    assert {f.split(",")[0] for f in flags} == {"-gencode=arch=compute_80", "-gencode=arch=compute_120"}
    assert not any("90a" in f for f in flags)


def _cmake():
    exe = Path(sys.executable).parent / "cmake"
    return str(exe) if exe.exists() else shutil.which("cmake")


@pytest.mark.parametrize("env", [
    {"APD_CUDA_ARCHS": "8.0;8.6+PTX, sm_90a compute_90"},
    {"APD_CUDA_ARCHS": "86", "TORCH_CUDA_ARCH_LIST": "8.0;9.0"},
    {"TORCH_CUDA_ARCH_LIST": "8.0 9.0+PTX"},
    {},
], ids=["apd", "apd-wins", "torch", "default"])
def test_cmake_resolves_the_same_list(env):
    """cmake/ApdCudaArchs.cmake gives setup.py's list (with the nvcc found here)."""
    cmake = _cmake()
    assert cmake, "cmake is a test dependency (the Makefile's TEST_DEPS)"
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not env and shutil.which("nvidia-smi"):
        not_applicable("the default list is what a machine without a visible GPU gets")
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout \
        if os.path.isfile(nvcc) else None
    nvcc_archs = [line.replace("compute_", "") for line in listed.split()] if listed else None
    e = {k: v for k, v in os.environ.items() if k not in ("APD_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST")}
    e.update(env)
    r = subprocess.run([cmake, "-P", str(ROOT / "cmake" / "ApdCudaArchs.cmake")], env=e, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = dict(line.split("=", 1) for line in r.stderr.splitlines() if "=" in line)
    want, source = _build_info.resolve_archs(env, [], nvcc_archs)
    def as_list(v):
        return v.split(";") if v else []
    assert as_list(got["sass"]) == want["sass"] and as_list(got["ptx"]) == want["ptx"], r.stderr
    assert got["source"] == source


def test_cmake_names_a_bad_arch_list():
    cmake = _cmake()
    r = subprocess.run([cmake, "-P", str(ROOT / "cmake" / "ApdCudaArchs.cmake")],
                       env={**os.environ, "APD_CUDA_ARCHS": "Ampere"}, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "APD_CUDA_ARCHS: expected architectures like" in r.stderr


needs_cuda_build = pytest.mark.skipif(
    torch.version.cuda is None or not os.path.isfile("/usr/local/cuda/bin/nvcc")
    or importlib.util.find_spec("cutlass_library") is None,
    reason="needs the CUDA torch, nvcc and nvidia-cutlass")


@needs_cuda_build
@pytest.mark.parametrize("env,line", [
    ({"APD_CUDA_ARCHS": "8.6+PTX", "TORCH_CUDA_ARCH_LIST": "9.0"},
     "SASS for sm_86 and PTX for compute_86 (APD_CUDA_ARCHS)"),
    ({"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}, "SASS for sm_80, sm_90 and no PTX (TORCH_CUDA_ARCH_LIST)"),
], ids=["apd", "torch"])
def test_setup_py_honours_the_arch_env(env, line):
    r = _setup_py({"APD_EXT_CUDA": "1", "CUDA_HOME": "/usr/local/cuda", **env})
    assert r.returncode == 0, r.stderr
    assert line in r.stderr, r.stderr


@needs_cuda_build
def test_setup_py_refuses_a_bad_arch_list_by_name():
    r = _setup_py({"APD_EXT_CUDA": "1", "CUDA_HOME": "/usr/local/cuda", "APD_CUDA_ARCHS": "hopper"})
    assert r.returncode != 0 and "APD_CUDA_ARCHS: expected architectures like" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------
# The build-info record compiled into the .so, and cuobjdump of the CUDA build
# ---------------------------------------------------------------------------

def test_the_built_so_carries_its_record():
    import apd_ext

    rec = _build_info.read_record(_build_info.extension_path())
    assert rec is not None, "the extension has no .apd_build_info section (built by this setup.py?)"
    assert rec["torch"] == torch.__version__ and rec["cxx11_abi"] == bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    info = apd_ext.build_info()
    assert {"version", "cpu", "cuda"} <= info.keys()  # the keys it always had
    assert info["cuda_kernels"] == info["cuda"] == rec["cuda_kernels"]
    assert info["cuda_archs"] == rec["cuda_archs"]
    if rec["cuda_kernels"]:
        assert rec["cuda_archs"]["sass"] and rec["cuda_version"]


def _cuobjdump():
    for cand in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
                 shutil.which("cuobjdump")):
        if cand and os.path.isfile(cand):
            return cand
    try:  # the CUDA torch's triton ships one
        import triton

        cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(cand) if cand.is_file() else None
    except ImportError:
        return None


def test_cuda_build_holds_what_its_record_says():
    """cuobjdump of the .so lists exactly the record's SASS and PTX; and CI's
    build (APD_EXT_CUDA=1, .ci/run unsets the arch variables: the default list)
    holds sm_80, sm_86, sm_89 and sm_90 cubins and a PTX."""
    import apd_ext

    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if not apd_ext.build_info()["cuda"]:
        assert not ci, "CI builds the CUDA kernels (APD_EXT_CUDA=1), but this .so is CPU-only"
        pytest.skip("a CPU-only build: no CUDA code to list")
    rec = _build_info.record()
    tool = _cuobjdump()
    assert tool, "cuobjdump not found (CUDA_HOME/bin, PATH, or triton's)"
    so = _build_info.extension_path()
    elf = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, timeout=300)
    ptx = subprocess.run([tool, "--list-ptx", so], capture_output=True, text=True, timeout=300)
    assert elf.returncode == 0 and ptx.returncode == 0, elf.stderr + ptx.stderr
    # "ELF file    1: _C.1.sm_80.cubin", "PTX file    1: _C.1.sm_120.ptx"
    cubins = set(re.findall(r"\.sm_(\w+)\.cubin", elf.stdout))
    ptxs = set(re.findall(r"\.sm_(\w+)\.ptx", ptx.stdout))
    assert cubins == set(rec["cuda_archs"]["sass"]), elf.stdout
    assert ptxs == set(rec["cuda_archs"]["ptx"]), ptx.stdout
    if ci or rec["arch_source"] == "the default list":
        assert {"80", "86", "89", "90"} <= cubins and ptxs, f"{elf.stdout}\n{ptx.stdout}"


# ---------------------------------------------------------------------------
# The clear errors (simulated: a build-info record and a fake device)
# ---------------------------------------------------------------------------

def _record(**kw):
    rec = {"cuda_kernels": True, "torch": torch.__version__, "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
           "source_dir": str(ROOT), "cuda_archs": {"sass": ["90a"], "ptx": []}, "cuda_version": "13.0",
           "arch_source": "APD_CUDA_ARCHS"}
    rec.update(kw)
    return rec


@pytest.fixture
def fake_build(monkeypatch):
    """fake_build(record, name, capability): this process's record and cuda:0."""
    calls = []

    def install(rec, name="NVIDIA RTX A5000", cap=(8, 6)):
        monkeypatch.setattr(_build_info, "_record", rec)
        monkeypatch.setattr(_build_info, "_record_read", True)
        monkeypatch.setattr(_build_info, "_checked", set())

        def props(index):
            calls.append(index)
            return name, cap
        monkeypatch.setattr(_build_info, "_device_props", props)
        return calls
    return install


@pytest.mark.parametrize("archs,cap,ok", [
    ({"sass": ["80"]}, (8, 6), True),  # sm_80 SASS runs on 8.6 and 8.9 ...
    ({"sass": ["80"]}, (8, 9), True),
    ({"sass": ["80"]}, (9, 0), False),  # ... not on another major
    ({"sass": ["86"]}, (8, 0), False),
    ({"sass": ["90a"]}, (9, 0), True),  # arch-specific: 9.0 only
    ({"sass": ["90a"]}, (10, 0), False),
    ({"sass": ["80"], "ptx": ["80"]}, (12, 0), True),  # PTX JIT-compiles forward ...
    ({"sass": [], "ptx": ["120"]}, (8, 9), False),  # ... never backward
    ({"sass": ["80", "86", "89", "90", "100", "120"], "ptx": ["120"]}, (12, 1), True),
])
def test_coverage_rule(archs, cap, ok):
    assert _build_info.covers(archs, cap) is ok


def test_missing_arch_is_one_clear_error(fake_build):
    fake_build(_record(), "NVIDIA RTX A5000", (8, 6))
    with pytest.raises(_build_info.BuildMismatchError) as e:
        _build_info.check_device(torch.device("cuda", 0))
    msg = str(e.value)
    assert "cuda:0 (NVIDIA RTX A5000, compute capability 8.6)" in msg  # the device
    assert "SASS for sm_90a and no PTX" in msg and "CUDA 13.0" in msg  # what was built
    assert f'cd {ROOT} && APD_EXT_CUDA=1 APD_CUDA_ARCHS="8.6" {sys.executable} -m pip install ' \
           "--no-build-isolation" in msg  # the command that rebuilds
    assert "\n" not in msg


def test_covered_device_is_checked_once(fake_build):
    calls = fake_build(_record(cuda_archs={"sass": ["80"], "ptx": ["80"]}), "NVIDIA H100", (9, 0))
    for _ in range(3):
        _build_info.check_device(torch.device("cuda", 0))
    assert calls == [0]  # cached per device


def test_cpu_only_build_on_a_cuda_machine_is_one_clear_error(fake_build):
    fake_build(_record(cuda_kernels=False, cuda_archs={"sass": [], "ptx": []}, cuda_version=None),
               "NVIDIA H100 80GB HBM3", (9, 0))
    with pytest.raises(_build_info.BuildMismatchError) as e:
        _build_info.check_device(torch.device("cuda", 0))
    msg = str(e.value)
    assert "no CUDA kernels" in msg and "CPU-only" in msg and "(NVIDIA H100 80GB HBM3, compute capability 9.0)" in msg
    assert 'APD_EXT_CUDA=1 APD_CUDA_ARCHS="9.0"' in msg and "--no-build-isolation" in msg


def test_cpu_only_build_without_a_record_asks_the_dispatcher(fake_build, monkeypatch):
    fake_build(None, "NVIDIA A100", (8, 0))
    monkeypatch.setattr(_build_info, "_has_cuda_kernels", lambda: False)
    with pytest.raises(_build_info.BuildMismatchError, match="this build has no CUDA kernels"):
        _build_info.check_device(torch.device("cuda", 0))


def _fake_cuda_args():
    i = torch.zeros(2, dtype=torch.int64, device="cuda")
    return torch.empty(2, 3, 5, device="cuda"), i


@pytest.mark.parametrize("op", ["sample_draft", "mixture_accept", "accept_prefix", "window_attention"])
def test_ops_check_the_build_before_dispatch(fake_build, op):
    """Through apd_ext.ops on (fake) CUDA tensors: the error comes from the
    validation path, before the dispatcher; a covered device goes through."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from apd_ext import ops

    def call():
        with FakeTensorMode():
            logits, i = _fake_cuda_args()
            draft = torch.zeros(2, 3, dtype=torch.int64, device="cuda")
            if op == "sample_draft":
                return ops.sample_draft(logits, i, i, i, i, check_lengths=False)
            if op == "mixture_accept":
                return ops.mixture_accept(logits, logits, draft, i, i, i, i, R=0.5, check_lengths=False)[0]
            if op == "accept_prefix":
                return ops.accept_prefix(draft, draft, i, check_lengths=False)
            q = torch.empty(2, 3, 4, 8, device="cuda")
            return ops.window_attention(q, q, q, i, i, i, causal=True, check_lengths=False)

    fake_build(_record(), "NVIDIA GeForce RTX 4090", (8, 9))
    with pytest.raises(_build_info.BuildMismatchError, match=r"cuda:0 \(NVIDIA GeForce RTX 4090"):
        call()
    fake_build(_record(cuda_archs={"sass": ["80", "90"], "ptx": ["90"]}), "NVIDIA GeForce RTX 4090", (8, 9))
    assert call().device.type == "cuda"


def test_torch_mismatch_is_one_clear_import_error(monkeypatch):
    for rec, why in ((_record(torch="2.13.0+cu128"), "built against torch 2.13.0+cu128, and this is torch"),
                     (_record(cxx11_abi=not torch._C._GLIBCXX_USE_CXX11_ABI), "C++11 ABI")):
        monkeypatch.setattr(_build_info, "_record", rec)
        monkeypatch.setattr(_build_info, "_record_read", True)
        with pytest.raises(_build_info.ExtensionImportError) as e:
            _build_info.load_extension()
        msg = str(e.value)
        assert why in msg and torch.__version__ in msg
        assert f"cd {ROOT} && APD_EXT_CUDA=1 {sys.executable} -m pip install --no-build-isolation" in msg


def test_undefined_symbol_is_reraised_clearly(monkeypatch):
    """A .so of another torch without a record: the ImportError of _C (an
    undefined symbol, typically) comes back as the one clear message."""
    import apd_ext

    monkeypatch.setattr(_build_info, "_record", None)
    monkeypatch.setattr(_build_info, "_record_read", True)
    monkeypatch.delattr(apd_ext, "_C")
    monkeypatch.setitem(sys.modules, "apd_ext._C", None)  # the import fails as a bad .so's would
    with pytest.raises(_build_info.ExtensionImportError, match="loading it failed .*Rebuild it against this torch"):
        _build_info.load_extension()


def test_unbuilt_package_says_so(monkeypatch):
    monkeypatch.setattr(_build_info, "extension_path", lambda: None)
    with pytest.raises(_build_info.ExtensionImportError, match=r"is not there: this package was not built. "
                       r"Build it: cd .* -m pip install --no-build-isolation --no-deps"):
        _build_info.load_extension()


def test_so_of_another_torch_fails_at_import_with_the_message(tmp_path):
    """End to end: a copy of the package whose .so records another torch (its
    record patched in place, same length); `import apd_ext` in a fresh
    interpreter stops with the message, before loading the library."""
    src = Path(_build_info.extension_path())
    pkg = tmp_path / "apd_ext"
    shutil.copytree(src.parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    data = (pkg / src.name).read_bytes()
    old = f'"torch": "{torch.__version__}"'.encode()
    assert data.count(old) == 1
    v = torch.__version__
    other = ("1" if v[0] != "1" else "3") + v[1:]  # another release, same length
    (pkg / src.name).write_bytes(data.replace(old, f'"torch": "{other}"'.encode()))
    code = "import apd_ext"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("apd_ext._build_info.ExtensionImportError: apd_ext: the compiled extension does not "
                           "fit this torch"), r.stderr
    assert "undefined symbol" not in r.stderr
