"""Build apd-ext: one extension, apd_ext._C, holding the CPU kernels and, when
torch has CUDA and nvcc is found, the CUDA kernels.

Environment:
  APD_EXT_CUDA=0|1        force the CPU-only or the CUDA build (default: auto: CUDA when
                          torch has CUDA and nvcc is found, else CPU with one warning)
  APD_CUDA_ARCHS="8.6+PTX" the CUDA architectures; the rule (python/apd_ext/_build_info.py,
                          the same in cmake/ApdCudaArchs.cmake): APD_CUDA_ARCHS, else
                          TORCH_CUDA_ARCH_LIST ("8.0;8.6+PTX;9.0" or "80;86"; +PTX adds PTX),
                          else the visible GPU's capability, else sm_80, 86, 89, 90 (+ sm_100,
                          sm_120 where nvcc lists them) and the PTX of the newest
  APD_NVCC_THREADS=N      nvcc --threads (default: 2)
  MAX_JOBS=N              parallel compile jobs (torch's ninja backend)
  APD_BUILD_TEMP=DIR      where the objects go (default: setuptools' build/temp.*)
"""
import glob
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys

# (torch >= 2.10 headers need C++20 on the host side; the torch-free .cu files use C++17.)
# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
if not os.environ.get("CUDA_HOME") and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from setuptools import find_namespace_packages, setup  # noqa: E402

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    """auto: the CUDA build when torch has CUDA and nvcc is found; otherwise the
    CPU build, with one warning naming the missing piece (never a failure)."""
    flag = os.environ.get("APD_EXT_CUDA", "auto").lower()
    have_torch = torch.version.cuda is not None
    have_nvcc = CUDA_HOME is not None and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not (have_torch and have_nvcc):
            sys.exit("APD_EXT_CUDA=1 but " + ("torch has no CUDA" if not have_torch else "nvcc was not found")
                     + " (install the CUDA build of torch / set CUDA_HOME)")
        return True
    if have_torch and have_nvcc:
        return True
    if have_nvcc:  # e.g. a CPU-only torch on a machine with the CUDA toolkit
        why = f"torch {torch.__version__} has no CUDA"
    elif have_torch:
        why = f"nvcc was not found under CUDA_HOME={CUDA_HOME} (set CUDA_HOME to the CUDA toolkit)"
    else:
        why = None  # no CUDA anywhere: the CPU build is the only one, nothing to warn about
    if why:
        print(f"warning: apd-ext: building the CPU kernels only: {why}; APD_EXT_CUDA=1 makes this an error",
              file=sys.stderr)
    return False


def cutlass_include():
    """The CuTe/CUTLASS headers of the nvidia-cutlass wheel, when installed. The
    tensor-core attention kernel (csrc/include/apd/cuda/attention_mma.cuh) is
    written with CuTe, so the CUDA build needs them (pyproject's build-system
    requires lists the wheel for pip's isolated builds); the CPU build does not."""
    try:
        import cutlass_library
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.isdir(os.path.join(path, "cute")) else None


def _load_build_info():
    """python/apd_ext/_build_info.py, loaded by path (the package needs _C): the
    one arch rule and the record's reader."""
    spec = importlib.util.spec_from_file_location("_apd_build_info", os.path.join(ROOT, "python", "apd_ext",
                                                                                   "_build_info.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_info = _load_build_info()


def nvcc_output(*args):
    try:
        return subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), *args], capture_output=True, text=True,
                              timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def cuda_archs():
    """(archs, where from): the rule of _build_info.resolve_archs."""
    listed = nvcc_output("--list-gpu-arch")
    nvcc_archs = re.findall(r"compute_(\w+)", listed) if listed else None
    caps = []
    if not (os.environ.get("APD_CUDA_ARCHS", "").strip() or os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()):
        try:  # a local build: the visible GPUs (none on a build server or in CI)
            if torch.cuda.is_available():
                caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        except Exception:  # a broken driver is "no visible GPU", not a failed build
            caps = []
    try:
        return build_info.resolve_archs(os.environ, caps, nvcc_archs)
    except ValueError as e:
        sys.exit(f"apd-ext: {e}")


def record_source(record: dict) -> str:
    """A C++ file holding the build-info record in its own ELF section, where
    apd_ext._build_info reads it without loading the library. Named by its
    content, so that concurrent builds of different variants never share it."""
    text = json.dumps(record, sort_keys=True)
    body = ("// Generated by setup.py: apd_ext's build-info record (read by apd_ext/_build_info.py).\n"
            f'extern "C" __attribute__((used, section("{build_info.SECTION}"))) '
            f"const char apd_build_info[] = {json.dumps(text)};\n")
    path = os.path.join(ROOT, "build", "gen", f"build_info_{hashlib.sha256(body.encode()).hexdigest()[:12]}.cpp")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # concurrent builds of one variant write the same text
        with open(tmp, "w") as f:
            f.write(body)
        os.replace(tmp, path)
    return os.path.relpath(path, ROOT)


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


cpu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
cpu_sources = [s for s in cpu_sources if not os.path.basename(s).startswith("ops_cuda")]
cuda_host_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "ops_cuda*.cpp")))
cuda_kernel_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))

include_dirs = [os.path.join(ROOT, "csrc", "include")]
cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-DAPD_EXT_BUILD"]
link_flags = ["-fopenmp"]

with_cuda = want_cuda()
record = {
    "cuda_kernels": with_cuda,
    "torch": torch.__version__,
    "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    "source_dir": ROOT,
    "cuda_archs": {"sass": [], "ptx": []},
    "cuda_version": None,
    "arch_source": None,
}

if with_cuda:
    if not cutlass_include():
        sys.exit("apd-ext: the CUDA build needs the CuTe headers of nvidia-cutlass (the tensor-core attention "
                 "kernel is written with CuTe): pip install nvidia-cutlass==4.2.0.0, or APD_EXT_CUDA=0 for the "
                 "CPU build")
    include_dirs.append(cutlass_include())
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "--use_fast_math" if os.environ.get("APD_FAST_MATH") == "1" else "-prec-div=true",
        f"--threads={os.environ.get('APD_NVCC_THREADS', '2')}",
        "-lineinfo",
    ]
    archs, arch_source = cuda_archs()
    version = re.search(r"release (\d+\.\d+)", nvcc_output("--version") or "")
    record.update(cuda_archs=archs, arch_source=arch_source, cuda_version=version.group(1) if version else None)
    nvcc_flags += build_info.gencode_flags(archs)
    print(f"apd-ext: CUDA {record['cuda_version']}: {build_info.format_archs(archs)} ({arch_source})",
          file=sys.stderr)
    ext = CUDAExtension(
        "apd_ext._C",
        cpu_sources + cuda_host_sources + cuda_kernel_sources + [record_source(record)],
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DAPD_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension(
        "apd_ext._C",
        cpu_sources + [record_source(record)],
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """APD_BUILD_TEMP=DIR keeps this build's objects in DIR (the Makefile gives
    each venv / torch its own, so that alternating builds never mix objects)."""

    def finalize_options(self):
        super().finalize_options()
        if os.environ.get("APD_BUILD_TEMP"):
            self.build_temp = os.environ["APD_BUILD_TEMP"]


setup(
    packages=find_namespace_packages("python", include=["apd_ext", "apd_ext.*"]),
    package_dir={"": "python"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
)
