"""Proof that the CPU emulator of the CUDA kernels (tests/emu) catches the bugs
it is for (issue 11): each test copies one real kernel header into a temp
include dir that shadows csrc/include, applies ONE textual mutation, builds the
small torch-free driver tests/emu/fault_driver.cpp against it and requires the
run to fail, in the way the fault calls for. A clean build of the same driver
must pass (otherwise the mutants would prove nothing).

The kernels carry no fault macro: the mutation is applied by the test, so the
product headers stay free of test-only #ifdefs.
"""
from __future__ import annotations

import hashlib
import pathlib
import re
import shutil
import subprocess

import pytest

import emu_backend

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "emu"
HEADERS = ROOT / "csrc" / "include" / "apd" / "cuda"
BUILD = ROOT / "build" / "emu-faults"
CXX = shutil.which("g++") or shutil.which("c++")

pytestmark = [pytest.mark.emu, pytest.mark.skipif(CXX is None or not __import__("platform").machine() == "x86_64",
                                                  reason="needs g++ on x86-64 (the emulator's fiber switch)")]

FLAGS = ["-O0", "-std=c++20", "-ffp-contract=off", "-fno-extern-tls-init", "-Wno-attributes"]


def _runtime_objects() -> list[str]:
    """emu.cpp and kernel_smem.cpp, compiled once (they do not depend on the kernels)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    objs = []
    for name in ("emu.cpp", "kernel_smem.cpp"):
        src = EMU / name
        key = hashlib.sha1(src.read_bytes() + (EMU / "include" / "apd_emu" / "emu.h").read_bytes()).hexdigest()[:12]
        obj = BUILD / f"{src.stem}-{key}.o"
        if not obj.exists():
            subprocess.run([CXX, *FLAGS, "-c", "-I", str(EMU / "include"), str(src), "-o", str(obj)], check=True)
        objs.append(str(obj))
    return objs


def build_and_run(target: str, tmp_path: pathlib.Path, header: str | None = None,
                  old: str | None = None, new: str | None = None) -> subprocess.CompletedProcess:
    """Build the driver for `target` ("SAMPLING" or "ATTN"), with `header`'s
    text `old` replaced by `new` (exactly one occurrence) when given, and run it."""
    inc = tmp_path / "shadow"
    (inc / "apd" / "cuda").mkdir(parents=True)
    if header is not None:
        text = (HEADERS / header).read_text()
        assert text.count(old) == 1, f"mutation site not found exactly once in {header}: {old!r}"
        (inc / "apd" / "cuda" / header).write_text(text.replace(old, new))
    exe = tmp_path / "driver"
    cmd = [CXX, *FLAGS, f"-DAPD_FAULT_{target}", "-I", str(inc), "-I", str(EMU / "include"),
           "-I", str(ROOT / "csrc" / "include"), "-I", emu_backend.cutlass_include(), str(EMU / "fault_driver.cpp"), *_runtime_objects(), "-rdynamic", "-o", str(exe)]  # -rdynamic: kernel names for dladdr
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)


def digest(run) -> str:
    m = re.search(r"RESULT ([0-9a-f]+)", run.stdout)
    return m.group(1) if m else ""


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Digests of the unmutated kernels: both drivers must pass."""
    out = {}
    for target in ("SAMPLING", "ATTN"):
        run = build_and_run(target, tmp_path_factory.mktemp(f"clean{target}"))
        assert run.returncode == 0 and digest(run), run.stdout + run.stderr
        out[target] = digest(run)
    return out


# Barriers of the sampler whose removal the schedules must expose; the driver
# runs top_k 300 (the radix passes) and top_k 5 (select_small).
SAMPLER_BARRIERS = {
    # Between zeroing the radix histogram and filling it: warps that run ahead
    # add counts that slower warps then zero.
    "radix": ("        sm_.hist_mass[b] = 0;\n      }\n      __syncthreads();\n",
              "        sm_.hist_mass[b] = 0;\n      }\n"),
    # The one that publishes select_small's chosen code: threads read the
    # broadcast before thread 0 has written it.
    "small_select": ("    if (threadIdx.x == 0) sm_.code64 = code;\n    __syncthreads();\n",
                     "    if (threadIdx.x == 0) sm_.code64 = code;\n"),
}


@pytest.mark.parametrize("barrier", sorted(SAMPLER_BARRIERS))
def test_removed_syncthreads_in_sampler_is_a_race(clean, tmp_path, barrier):
    run = build_and_run("SAMPLING", tmp_path, "sampling.cuh", *SAMPLER_BARRIERS[barrier])
    assert run.returncode != 0, run.stdout
    assert "SCHEDULE DEPENDENT sample_draft" in run.stdout, run.stdout


def test_wrong_mma_fragment_index_is_a_wrong_result(clean, tmp_path):
    # P's A-operand view of the S accumulators with the row-half and k-half
    # registers swapped: every P V atom then reads the wrong fragment.
    run = build_and_run("ATTN", tmp_path, "attention_mma.cuh",
                        "make_layout(get<0>(get<0>(d)), get<1>(get<0>(d)), get<0>(get<2>(d)))",
                        "make_layout(get<0>(get<0>(d)), get<0>(get<2>(d)), get<1>(get<0>(d)))")
    assert run.returncode != 0, run.stdout
    assert "WRONG RESULT window_attention(mma)" in run.stdout, run.stdout


def test_missing_cp_async_wait_reads_stale_shared_memory(clean, tmp_path):
    run = build_and_run("ATTN", tmp_path, "attention_mma.cuh", "      atoms::cp_async_wait<1>();\n", "")
    assert run.returncode != 0, run.stdout
    # The stale bytes are the poison of fresh shared memory, which differs
    # between schedules, or a previous tile: either way the run fails.
    assert "SCHEDULE DEPENDENT" in run.stdout or "WRONG RESULT" in run.stdout, run.stdout


def test_shuffle_with_wrong_mask_is_a_hard_error(clean, tmp_path):
    run = build_and_run("ATTN", tmp_path, "attention_mma.cuh",
                        "mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));",
                        "mx = fmaxf(mx, __shfl_xor_sync(0x0000ffffu, mx, 1));")
    assert run.returncode != 0, run.stdout
    assert "HARNESS ERROR" in run.stdout and "__shfl_xor_sync" in run.stdout, run.stdout
    assert "window_attention_mma_kernel" in run.stdout and "warp" in run.stdout and "0x0000ffff" in run.stdout, \
        run.stdout


def test_execution_model_selftest(tmp_path):
    """The harness itself: ldmatrix x1/x2/x4 (+.trans), shuffles with widths,
    votes, match, __activemask under divergence, 32/64-bit atomics, and the hard
    errors (divergent __syncthreads, shuffle of absent lanes, launch limits,
    the dynamic shared-memory attribute), under the three schedules."""
    exe = tmp_path / "selftest"
    subprocess.run([CXX, *FLAGS, "-I", str(EMU / "include"), "-I", str(ROOT / "csrc" / "include"),
                    str(EMU / "selftest.cpp"), *_runtime_objects(), "-rdynamic", "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "SELFTEST OK" in run.stdout, run.stdout + run.stderr


def test_emulated_cute_atoms(tmp_path):
    """The emulated CuTe atoms (tests/emu/include/apd/cuda/cute_atoms.cuh) driven
    through CuTe's TiledMMA / TiledCopy as the mma attention kernel drives them:
    A B^T (ldmatrix) and A V (ldmatrix.trans) from cp.async zero-fill loads,
    exact on integer inputs, bf16 and fp16, under the three schedules."""
    exe = tmp_path / "cute_atoms_test"
    subprocess.run([CXX, *FLAGS, "-I", str(EMU / "include"), "-I", str(ROOT / "csrc" / "include"),
                    "-I", emu_backend.cutlass_include(), str(EMU / "cute_atoms_test.cpp"), *_runtime_objects(),
                    "-rdynamic", "-o", str(exe)], check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "CUTE ATOMS OK" in run.stdout, run.stdout + run.stderr
