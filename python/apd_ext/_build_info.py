"""What apd_ext._C was built for, and the clear errors when it does not fit.

The record: setup.py compiles a JSON record into the extension, in its own
ELF section (.apd_build_info): the CUDA architectures (SASS and PTX), the CUDA
version, the torch version and C++ ABI it was built against, whether the CUDA
kernels are in it, and the source tree it came from. It is read from the file
without loading the library (a few header reads, whatever the .so's size), so
that a .so built against another torch is named as such instead of failing
with an undefined symbol, and it can never disagree with the .so it sits in.

The arch rule (setup.py uses it; cmake/ApdCudaArchs.cmake implements the same):
  1. APD_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST, when set: "8.0;8.6+PTX;9.0",
     "80;86", "sm_90a", separated by ';', ',' or spaces; "+PTX" adds the PTX.
  2. Otherwise, a visible GPU: its capability (SASS + PTX), every visible GPU's.
  3. Otherwise (CI, wheels): SASS for sm_80, 86, 89, 90, plus sm_100 and sm_120
     where the nvcc in use lists them, plus the PTX of the newest (it JIT-compiles
     on any later GPU). "90a" only for a kernel that needs Hopper instructions
     (none today).

Coverage (the check at the first CUDA call): SASS sm_XY runs on capability X.y
for y >= Y (binary compatibility within a major); an arch-specific sm_XYa only
on X.Y itself. PTX compute_XY JIT-compiles on any capability >= X.Y.

This module is a leaf (no apd_ext imports; torch only inside functions), so
setup.py loads it by path before the package can be imported.
"""
from __future__ import annotations

import json
import os
import re
import struct
import sys

SECTION = ".apd_build_info"
DEFAULT_SASS = ("80", "86", "89", "90")
NEWER_SASS = ("100", "120")  # added where `nvcc --list-gpu-arch` lists them
_TOKEN = re.compile(r"^(sm_|compute_)?(\d{1,2})\.?(\d)([af]?)(\+ptx)?$", re.IGNORECASE)


class BuildMismatchError(RuntimeError):
    """The extension has no kernels for this device (CPU-only build, missing arch)."""


class ExtensionImportError(ImportError):
    """apd_ext._C cannot be loaded into this torch (built against another one)."""


# ---------------------------------------------------------------------------
# The arch list (build time)
# ---------------------------------------------------------------------------

def parse_arch_list(text: str, name: str = "APD_CUDA_ARCHS") -> dict:
    """'8.0;8.6+PTX;9.0' / '80 86' / 'sm_90a' / 'compute_90' -> {"sass": [...], "ptx": [...]}
    (arch strings as nvcc spells them: "80", "90a", "120")."""
    sass, ptx = [], []
    for tok in re.split(r"[;,\s]+", text.strip()):
        if not tok:
            continue
        m = _TOKEN.match(tok)
        if not m:
            raise ValueError(f"{name}: expected architectures like \"8.0;8.6+PTX;9.0\", \"80;86\" or \"sm_90a\", "
                             f"got {tok!r} in {text!r}")
        prefix, major, minor, suffix, plus_ptx = m.groups()
        arch = f"{int(major)}{minor}{suffix.lower()}"
        if prefix is None or prefix.lower() == "sm_":
            sass.append(arch)
        if plus_ptx or (prefix or "").lower() == "compute_":
            ptx.append(arch)
    if not sass and not ptx:
        raise ValueError(f"{name}: expected at least one architecture, got {text!r}")
    return {"sass": _unique(sass), "ptx": _unique(ptx)}


def _unique(archs):
    return sorted(set(archs), key=_arch_key)


def _arch_key(arch: str):
    major, minor, suffix = split_arch(arch)
    return (major, minor, suffix)


def split_arch(arch: str) -> tuple:
    """"86" -> (8, 6, ""), "120" -> (12, 0, ""), "90a" -> (9, 0, "a")."""
    m = re.match(r"^(\d+)(\d)([af]?)$", arch)
    if not m:
        raise ValueError(f"not an architecture: {arch!r}")
    return int(m.group(1)), int(m.group(2)), m.group(3)


def resolve_archs(env, device_caps, nvcc_archs) -> tuple:
    """The rule of the module docstring. env: a mapping (os.environ); device_caps:
    [(major, minor)] of the visible GPUs ([] for none); nvcc_archs: the archs
    `nvcc --list-gpu-arch` lists (["75", "80", ..., "120"]), None if unknown.
    Returns ({"sass": [...], "ptx": [...]}, where the list came from)."""
    for name in ("APD_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        if env.get(name, "").strip():
            return parse_arch_list(env[name], name), name
    caps = sorted({f"{ma}{mi}" for ma, mi in device_caps}, key=_arch_key)
    if caps and (nvcc_archs is None or all(c in nvcc_archs for c in caps)):
        return {"sass": caps, "ptx": [caps[-1]]}, "the visible GPU"
    sass = list(DEFAULT_SASS) + [a for a in NEWER_SASS if nvcc_archs is not None and a in nvcc_archs]
    return {"sass": sass, "ptx": [sass[-1]]}, "the default list"


def gencode_flags(archs: dict) -> list:
    """nvcc flags for the record's archs. Every plain SASS arch (no a/f suffix)
    is compiled from the PTX of the lowest one: nvcc runs its front end (cicc)
    once per virtual arch and only ptxas per real arch, and the front end is
    most of the time (attention_mma_bf16.cu, one core: 26.2 s for sm_80 alone,
    28.3 s for sm_80 + sm_86 + sm_89 from compute_80). No kernel has a path for
    a newer arch (no __CUDA_ARCH__ >= 900 branch; the CuTe atoms are SM80's),
    so the SASS is what a per-arch front end would give. An arch-specific
    target (90a, 100f, ...) keeps its own virtual arch; PTX is emitted as listed."""
    plain = sorted((a for a in archs["sass"] if not split_arch(a)[2]), key=_arch_key)
    special = [a for a in archs["sass"] if split_arch(a)[2]]
    return ([f"-gencode=arch=compute_{plain[0]},code=sm_{a}" for a in plain]
            + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in special]
            + [f"-gencode=arch=compute_{a},code=compute_{a}" for a in archs["ptx"]])


def format_archs(archs: dict) -> str:
    sass = ", ".join(f"sm_{a}" for a in archs.get("sass", [])) or "no SASS"
    ptx = ", ".join(f"compute_{a}" for a in archs.get("ptx", []))
    return f"SASS for {sass}" + (f" and PTX for {ptx}" if ptx else " and no PTX")


# ---------------------------------------------------------------------------
# The record (read from the .so's ELF section)
# ---------------------------------------------------------------------------

def read_record(path: str):
    """The JSON record in `path`'s .apd_build_info section; None when the file
    has none (or is not a 64-bit little-endian ELF file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None
            shoff, = struct.unpack_from("<Q", head, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
            _, _, _, _, str_off, str_size = sections[shstrndx]
            f.seek(str_off)
            names = f.read(str_size)
            for name_off, _, _, _, off, size in sections:
                if names[name_off:names.index(b"\0", name_off)] == SECTION.encode():
                    f.seek(off)
                    return json.loads(f.read(size).rstrip(b"\0").decode())
    except (OSError, ValueError, struct.error, IndexError):
        return None
    return None


def extension_path():
    """The file `import apd_ext._C` would load (None when there is none)."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = os.path.join(here, "_C" + suffix)
        if os.path.isfile(candidate):
            return candidate
    spec = importlib.util.find_spec("apd_ext._C")
    return spec.origin if spec is not None else None


_record = None
_record_read = False


def record():
    """This install's record (cached); None when the .so carries none."""
    global _record, _record_read
    if not _record_read:
        path = extension_path()
        _record = read_record(path) if path else None
        _record_read = True
    return _record


def rebuild_command(rec, cuda: bool, archs: str | None = None) -> str:
    """The command that rebuilds the extension for this python and its torch
    (--no-build-isolation: an isolated build would fetch another torch)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python/apd_ext -> root
    src = next((d for d in ((rec or {}).get("source_dir"), here) if d and os.path.isfile(os.path.join(d, "setup.py"))),
               "<the apd-ext source tree>")
    so = extension_path() or ""
    editable = src != "<the apd-ext source tree>" and os.path.abspath(so).startswith(os.path.abspath(src) + os.sep)
    env = "APD_EXT_CUDA=1" if cuda else "APD_EXT_CUDA=0"
    if cuda and archs:
        env += f' APD_CUDA_ARCHS="{archs}"'
    return (f"cd {src} && {env} {sys.executable} -m pip install --no-build-isolation --no-deps "
            f"{'-e ' if editable else ''}.")


def _describe(rec) -> str:
    if rec is None:
        return "an apd_ext build without a build-info record"
    what = (f"with CUDA {rec.get('cuda_version')} kernels ({format_archs(rec.get('cuda_archs', {}))})"
            if rec.get("cuda_kernels") else "CPU-only (no CUDA kernels)")
    return f"built {what} against torch {rec.get('torch')} (C++11 ABI {rec.get('cxx11_abi')})"


# ---------------------------------------------------------------------------
# The torch check (import time)
# ---------------------------------------------------------------------------

def torch_mismatch(rec):
    """Why the .so cannot load into the running torch, or None."""
    import torch

    if rec is None:
        return None
    built, running = str(rec.get("torch", "")), torch.__version__
    abi = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    if built.split("+")[0] != running.split("+")[0]:
        return f"it was built against torch {built}, and this is torch {running}"
    if bool(rec.get("cxx11_abi")) != abi:
        return f"it was built with C++11 ABI {rec.get('cxx11_abi')}, and this torch {running} uses {abi}"
    if rec.get("cuda_kernels") and torch.version.cuda is None:
        return f"it holds CUDA kernels (built against torch {built}), and this torch {running} has no CUDA"
    return None


def _torch_message(rec, why: str) -> str:
    return (f"apd_ext: the compiled extension does not fit this torch: {why}. The extension is {_describe(rec)}; "
            f"C++ code built against one torch cannot load into another. Rebuild it against this torch: "
            f"{rebuild_command(rec, bool(rec and rec.get('cuda_kernels')))}")


def load_extension():
    """Import apd_ext._C (registering torch.ops.apd.*) after checking that it was
    built against this torch; one clear ExtensionImportError otherwise."""
    if extension_path() is None:
        raise ExtensionImportError(
            "apd_ext: the compiled extension (apd_ext._C) is not there: this package was not built. Build it: "
            f"{rebuild_command(None, False).replace('APD_EXT_CUDA=0 ', '')}")
    rec = record()
    why = torch_mismatch(rec)
    if why:
        raise ExtensionImportError(_torch_message(rec, why))
    try:
        from apd_ext import _C
    except ImportError as e:
        # e.g. an undefined torch symbol: a .so of another torch without a record.
        raise ExtensionImportError(_torch_message(rec, f"loading it failed ({e})")) from e
    return _C


# ---------------------------------------------------------------------------
# The device check (the first CUDA call on each device)
# ---------------------------------------------------------------------------

def covers(archs: dict, cap: tuple) -> bool:
    """Whether SASS or PTX in `archs` runs on compute capability cap = (major, minor)."""
    major, minor = cap
    for arch in archs.get("sass", []):
        ma, mi, suffix = split_arch(arch)
        if (ma == major and mi == minor) if suffix == "a" else (ma == major and mi <= minor):
            return True
    for arch in archs.get("ptx", []):
        ma, mi, suffix = split_arch(arch)
        if (ma, mi) == (major, minor) if suffix == "a" else (ma, mi) <= (major, minor):
            return True
    return False


def _device_props(index: int) -> tuple:
    """(name, (major, minor)) of cuda:index. Tests replace it to fake a device."""
    import torch

    return torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)


def _has_cuda_kernels() -> bool:
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("apd::sample_draft", "CUDA")


_checked: set = set()


def check_device(device) -> None:
    """Raise one BuildMismatchError when this build cannot run on the CUDA
    `device` (a torch.device); cheap after the first call per device (cached)."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _checked:
        return
    rec = record()
    name, cap = _device_props(index)
    where = f"cuda:{index} ({name}, compute capability {cap[0]}.{cap[1]})"
    here = f"{cap[0]}.{cap[1]}"
    built_cuda = rec.get("cuda_kernels") if rec is not None else _has_cuda_kernels()
    if not built_cuda:
        raise BuildMismatchError(
            f"apd_ext: this build has no CUDA kernels, and the tensors are on {where}. The extension is "
            f"{_describe(rec)} (the CPU-only build: nvcc was not found, torch had no CUDA, or APD_EXT_CUDA=0). "
            f"Rebuild it with the CUDA kernels: {rebuild_command(rec, True, here)}")
    if rec is not None and not covers(rec.get("cuda_archs", {}), cap):
        raise BuildMismatchError(
            f"apd_ext: this build has no kernels for {where}: it is {_describe(rec)}, and neither SASS for "
            f"sm_{cap[0]}{cap[1]} (or an earlier {cap[0]}.x) nor PTX at or below compute_{cap[0]}{cap[1]} is in "
            f"it. Rebuild it for this GPU: {rebuild_command(rec, True, here)}")
    _checked.add(index)
