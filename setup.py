"""Build apd-ext: one extension, apd_ext._C, holding the CPU kernels and, when
torch has CUDA and nvcc is found, the CUDA kernels.

Environment:
  APD_EXT_CUDA=0|1        force the CPU-only or the CUDA build (default: auto)
  APD_CUDA_ARCHS="90a;80" SM architectures to compile for (default: 90a)
  APD_NVCC_THREADS=N      nvcc --threads (default: 2)
  MAX_JOBS=N              parallel compile jobs (torch's ninja backend)
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
    flag = os.environ.get("APD_EXT_CUDA", "auto").lower()
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not have:
            sys.exit("APD_EXT_CUDA=1 but torch has no CUDA or nvcc was not found (set CUDA_HOME)")
        return True
    return have


def cutlass_include() -> str:
    try:
        import cutlass_library
    except ImportError:
        sys.exit("the CUDA build needs CuTe/CUTLASS headers: pip install nvidia-cutlass==4.2.0.0")
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    if not os.path.isdir(os.path.join(path, "cute")):
        sys.exit(f"nvidia-cutlass is installed but {path} has no cute/ headers")
    return path


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

setup(
    packages=find_namespace_packages("python", include=["apd_ext", "apd_ext.*"]),
    package_dir={"": "python"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
