"""Argument checks shared by the op wrappers: each failure names the argument,
what was expected and what came (DESIGN.md §7)."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int32, torch.int64)


def fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
) -> torch.Tensor:
    """Check type, rank, dtype, device and (partial) shape; None in `shape` is a wildcard."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        fail(name, f"a {ndim}-D tensor", f"{t.dim()}-D with shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            fail(name, f"dtype {names}", str(t.dtype).replace("torch.", ""))
    if device is not None and t.device != device:
        fail(name, f"a tensor on {device}", f"one on {t.device}")
    if shape is not None:
        ok = len(shape) == t.dim() and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            fail(name, f"shape {want}", list(t.shape))
    return t


def check_batch_vector(name: str, t, batch: int, device: torch.device) -> torch.Tensor:
    """A per-sequence [B] int32/int64 tensor on `device`."""
    return check_tensor(name, t, ndim=1, dtypes=INT_DTYPES, device=device, shape=(batch,))


def check_range(name: str, value: float, lo: float, hi: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not (lo <= value <= hi):
        fail(name, f"a value in [{lo}, {hi}]", value)
    return value


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        fail(name, "one of " + ", ".join(repr(c) for c in choices), repr(value))


def check_device(name: str, device) -> torch.device:
    """A device the runtime can use now: "auto" / None is CUDA when torch sees a
    GPU, else the CPU. A CUDA device that is not present (no GPU, a CPU-only
    torch, an index past the count) is one ValueError naming `name`, not torch's
    "Torch not compiled with CUDA enabled" deep in the first copy."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        fail(name, "'cpu', 'cuda', 'cuda:N' or 'auto'", repr(device))
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        fail(name, "'cpu', 'cuda', 'cuda:N' or 'auto' (the kernels run on the CPU and CUDA only)", repr(str(dev)))
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "none visible to torch"
        raise ValueError(f"{name}: {str(dev)!r} is not present here: no CUDA device ({why}); use 'cpu' or 'auto'")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"{name}: {str(dev)!r} is not present here: {count} CUDA device(s), "
                         f"cuda:0 .. cuda:{count - 1}")
    return dev
