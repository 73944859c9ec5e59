"""Build apd-ext: one extension, apd_ext._C, holding the CPU kernels and, when
torch has CUDA and nvcc is found, the CUDA kernels.

Environment:
  APD_EXT_CUDA=0|1        force the CPU-only or the CUDA build (default: auto: CUDA when
                          torch has CUDA and nvcc is found, else CPU with one warning)
  APD_CUDA_ARCHS="90a;80" SM architectures to compile for (default: 90a)
  APD_NVCC_THREADS=N      nvcc --threads (default: 2)
  MAX_JOBS=N              parallel compile jobs (torch's ninja backend)
  APD_BUILD_TEMP=DIR      where the objects go (default: setuptools' build/temp.*)
"""
import glob
import os
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


def gencode_flags() -> list:
    flags = []
    for arch in os.environ.get("APD_CUDA_ARCHS", "90a").replace(",", ";").split(";"):
        arch = arch.strip().replace("sm_", "").replace(".", "")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


cpu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
cpu_sources = [s for s in cpu_sources if not os.path.basename(s).startswith("ops_cuda")]
cuda_host_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "ops_cuda*.cpp")))
cuda_kernel_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))

include_dirs = [os.path.join(ROOT, "csrc", "include")]
cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-DAPD_EXT_BUILD"]
link_flags = ["-fopenmp"]

if want_cuda():
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
    ] + gencode_flags()
    ext = CUDAExtension(
        "apd_ext._C",
        cpu_sources + cuda_host_sources + cuda_kernel_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DAPD_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension(
        "apd_ext._C",
        cpu_sources,
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
