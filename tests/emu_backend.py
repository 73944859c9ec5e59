"""TEST-ONLY: the CPU emulator of the CUDA kernels (tests/emu, issue 11).

load() JIT-builds tests/emu into a torch extension (build/emu, cached between
runs) that registers the CUDA launchers of csrc/cuda, compiled as host code
against the CPU execution model, as torch.ops.apd_emu.* for CPU tensors. It is
never imported by apd_ext and never shipped: a test asks for it by name.

ops() returns an object with apd_ext.ops' signatures (sample_draft,
mixture_accept, accept_prefix, window_attention) whose calls go through the
same Python validation as apd_ext.ops and then to torch.ops.apd_emu instead of
torch.ops.apd, so the CUDA test matrix runs unchanged with device "cpu".
Every emulated call runs under three schedules (forward, reverse, seeded
shuffle) and fails if their results differ.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import threading
import types

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The emulator is ~1000x slower than a device: CI runs a quick subset of the
# CUDA test matrix on it (every mode, dtype and kernel, fewer sizes);
# APD_EMU_FULL=1 runs all of it (tens of minutes on 2 cores).
FULL = os.environ.get("APD_EMU_FULL", "") == "1"
EMU = ROOT / "tests" / "emu"
_lock = threading.Lock()
_loaded = False


def sources() -> list[str]:
    return [str(EMU / n) for n in (
        "emu.cpp", "kernel_smem.cpp", "ops_emu.cpp",
        "kernels_sampling.cpp", "kernels_attention_simple.cpp", "kernels_attention_mma.cpp",
    )]


def cutlass_include() -> str:
    """The CuTe headers of the nvidia-cutlass wheel (a test dependency): the mma
    attention kernel is written with CuTe. Missing headers are an error, not a skip."""
    try:
        import cutlass_library
    except ImportError as e:
        raise RuntimeError("tests/emu needs the CuTe headers: pip install nvidia-cutlass==4.2.0.0") from e
    path = pathlib.Path(cutlass_library.__file__).parent / "source" / "include"
    if not (path / "cute").is_dir():
        raise RuntimeError(f"tests/emu: no CuTe headers under {path}")
    return str(path)


def include_dirs(emu_include: pathlib.Path = EMU / "include") -> list[str]:
    # The shadow dir comes first: <cuda_runtime.h>, <cuda_fp16.h>, cub/..., the
    # libcu++ / vector-type headers CuTe includes, and the apd/cuda/{ptx,launch,
    # cute_atoms}.cuh twins resolve there, never in a CUDA toolkit. CuTe last.
    return [str(emu_include), str(ROOT / "csrc" / "include"), str(ROOT / "csrc"), cutlass_include()]


# -fno-extern-tls-init: the dynamic shared-memory arrays are `extern thread_local`
# (kernel_smem.cpp) with no dynamic initialiser; without it GCC calls their weak,
# undefined TLS init function through a null pointer.
# FMA contraction: nvcc contracts a * b + c into fused multiply-adds by default
# (--fmad=true), and the fp32 attention tolerances are tight enough (D = 256)
# that unfused host arithmetic fails them; GCC's -ffp-contract=fast with -mfma
# fuses the same kind of expressions (not necessarily the same ones). The row
# math that must not fuse uses __fmul_rn / __fadd_rn, which stay unfused here.
def _have_fma() -> bool:
    try:
        return " fma " in open("/proc/cpuinfo").read().replace("\n", " ")
    except OSError:
        return False


CFLAGS = ["-O2", "-std=c++20", "-fno-fast-math", "-fno-extern-tls-init", "-Wno-attributes"] + (
    ["-mfma", "-ffp-contract=fast"] if _have_fma() else ["-ffp-contract=off"])


def load(name: str = "apd_emu_ext", emu_include: pathlib.Path | None = None, build_dir: pathlib.Path | None = None):
    """Build (or reuse) the emulator extension and load it into torch.ops.apd_emu."""
    global _loaded
    from torch.utils.cpp_extension import load as jit_load

    with _lock:
        if _loaded and emu_include is None:
            return torch.ops.apd_emu
        build = build_dir or ROOT / "build" / "emu"
        build.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MAX_JOBS", "2")
        jit_load(
            name=name,
            sources=sources(),
            extra_include_paths=include_dirs(emu_include or EMU / "include"),
            extra_cflags=CFLAGS,
            extra_ldflags=["-Wl,-Bsymbolic"],
            build_directory=str(build),
            is_python_module=False,
            with_cuda=False,
            verbose=False,
        )
        if emu_include is None:
            _loaded = True
    return torch.ops.apd_emu


class _TorchProxy(types.ModuleType):
    """torch, except that torch.ops.apd is torch.ops.apd_emu."""

    def __init__(self):
        super().__init__("torch")
        self.ops = types.SimpleNamespace(apd=torch.ops.apd_emu)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def _routed():
    from apd_ext import ops as real_ops

    saved = real_ops.torch
    real_ops.torch = _TorchProxy()
    try:
        yield real_ops
    finally:
        real_ops.torch = saved


class EmuOps:
    """apd_ext.ops on the emulated CUDA kernels (CPU tensors)."""

    def __init__(self, attn_impl: str = "simple", attn_splits: int = 0):
        load()
        self.attn_impl = attn_impl
        self.attn_splits = attn_splits

    def sample_draft(self, *args, **kw):
        with _routed() as o:
            return o.sample_draft(*args, **kw)

    def mixture_accept(self, *args, **kw):
        with _routed() as o:
            return o.mixture_accept(*args, **kw)

    def accept_prefix(self, *args, **kw):
        with _routed() as o:
            return o.accept_prefix(*args, **kw)

    def window_attention(self, *args, **kw):
        impl, splits = self.attn_impl, self.attn_splits
        emu = torch.ops.apd_emu

        def attn(q, k, v, q_start, q_len, kv_len, causal, scale):
            return emu.window_attention(q, k, v, q_start, q_len, kv_len, causal, scale, impl, splits)

        from apd_ext import ops as real_ops

        saved = real_ops.torch
        proxy = _TorchProxy()
        proxy.ops = types.SimpleNamespace(apd=types.SimpleNamespace(window_attention=attn))
        real_ops.torch = proxy
        try:
            return real_ops.window_attention(*args, **kw)
        finally:
            real_ops.torch = saved


# The harness's device profiles, by device id (tests/emu/emu.cpp kProfiles):
# device 0 (H100, the default) runs every emulated test; the others run a
# quick subset in CI (tests opted in by name, on a few shapes: profile_quick)
# and everything with APD_EMU_FULL=1.
PROFILES = ("H100", "A100", "A5000", "RTX4090")


def backend_params():
    """pytest params of the CUDA test modules' `backend` fixture: the device,
    the emulator on the default profile, and the emulator on each other profile."""
    import pytest

    return ([pytest.param("cuda", marks=pytest.mark.cuda), pytest.param("emu", marks=pytest.mark.emu)]
            + [pytest.param(f"emu-{n}", marks=pytest.mark.emu) for n in PROFILES[1:]])


@contextlib.contextmanager
def on_profile(param: str, test_name: str, profile_tests):
    """For a backend param "emu-<profile>": load the emulator, make that
    profile the active device (the planners read it through the emulated
    cudaDeviceGetAttribute) and restore device 0 afterwards. Outside
    APD_EMU_FULL=1, a test not named in profile_tests is skipped there."""
    name = param.split("-", 1)[1] if param.startswith("emu-") else PROFILES[0]
    if name != PROFILES[0] and not FULL and test_name not in profile_tests:
        from skips import not_applicable

        not_applicable(f"outside the emulator's quick subset on the {name} profile (APD_EMU_FULL=1 runs it)")
    emu = load()
    dev = PROFILES.index(name)
    assert emu.device_profile(dev)[0] == name, (emu.device_profile(dev), name)
    emu.set_device(dev)
    try:
        yield name
    finally:
        emu.set_device(0)


def profile_quick(keep: bool) -> None:
    """Inside a test opted in to the other profiles: skip this case there
    outside its quick subset (unless APD_EMU_FULL=1)."""
    if not FULL and not keep and _loaded and torch.ops.apd_emu.get_device() != 0:
        from skips import not_applicable

        not_applicable("outside the emulator's quick subset on this device profile (APD_EMU_FULL=1 runs it)")


def quick(backend: str, keep: bool) -> None:
    """Skip a case on the emulator outside its quick subset (unless APD_EMU_FULL=1)."""
    if backend == "emu" and not FULL and not keep:
        from skips import not_applicable

        not_applicable("outside the emulator's quick subset (APD_EMU_FULL=1 runs it)")


def ops(**kw) -> EmuOps:
    return EmuOps(**kw)
