"""Packed variable-length windows: a host plan of the rows a forward computes.

A forward over B sequences of a window of Lw rows has row j of sequence b
valid while j < q_len[b] (models/qwen2.py). Padded, it costs B * Lw rows in
every GEMM; packed, N = sum(q_len). The rows are listed on the HOST from
lengths the caller already holds there (the Engine's window bounds are host
values), cu_seqlens style:

    cu_seqlens = [0, q_len[0], q_len[0] + q_len[1], ...]   # [B + 1], host
    index[cu_seqlens[b] + j] = b * Lw + j   for j < q_len[b]  # [N], flat rows of [B * Lw]

and `index` goes to the device with one non-blocking copy (pinned memory on
CUDA; the Engine puts it in the step's one copy, decoding/runner.py StepArgs).
The forward then gathers the valid rows with it: N is a host int, so nothing
reads a device value (no nonzero(), no .item(), no shape from device data)
and the packed forward stays free of host synchronisation.

Memory traffic of the plan itself: 8 N bytes host->device, against the
B * Lw - N padding rows it saves in every layer's GEMMs (a long prompt
joining 8 short decoding rows: bench/NOTES.md, "Packed windows").
"""
from __future__ import annotations

from typing import Optional

import torch

from apd_ext._validate import check_tensor, fail


def pack_index(q_len: torch.Tensor, window: int) -> torch.Tensor:
    """q_len: host [B] int lengths in [0, window] -> host [N] int64 flat rows
    b * window + j (j < q_len[b]) of the [B * window] layout, b-major."""
    q_len = q_len.to(torch.int64)
    n = int(q_len.sum())
    b = torch.repeat_interleave(torch.arange(q_len.numel(), dtype=torch.int64), q_len, output_size=n)  # [N]
    first = torch.cumsum(q_len, 0) - q_len  # [B] packed index of each sequence's row 0
    j = torch.arange(n, dtype=torch.int64) - first.repeat_interleave(q_len, output_size=n)  # [N]
    return b * window + j


def _check_lengths(q_len, window) -> torch.Tensor:
    check_tensor("q_len", q_len, ndim=1, dtypes=(torch.int32, torch.int64), device=torch.device("cpu"))
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        fail("window", "an int >= 1 (the forward's Lw)", window)
    if bool((q_len < 0).any()) or bool((q_len > window).any()):
        fail("q_len", f"host lengths in [0, {window}]", q_len.tolist())
    return q_len.to(torch.int64)


class Packing:
    """The plan of one forward: q_len (host [B] int64), the window Lw, and
    index ([N] int64 on the model's device, see the module docstring).

    Build it with Packing.build(q_len, window, device), or from an index the
    caller has already placed on the device (Packing(q_len, window, index)).
    dense is True when packing would change nothing (N == B * Lw) or there is
    no row at all (N == 0, e.g. a graph capture): the forward then runs the
    padded layout.

    per_request: the batch-invariant plan (Engine(batch_invariant=True),
    docs/SEMANTICS.md "Batch invariance"). Every GEMM of the forward then runs
    once per sequence over that sequence's own rows (segments), so its shape,
    and with it the BLAS kernel and its reduction order, comes from the
    request's own lengths, never from its batch-mates'. logit_counts (host [B]
    int64, needed with logit_rows): how many of the logit rows asked for are
    the sequence's own (the LM head's GEMM covers those only; the others come
    back as zeros)."""

    __slots__ = ("q_len", "window", "index", "n", "per_request", "logit_counts")

    def __init__(self, q_len: torch.Tensor, window: int, index: torch.Tensor, *, per_request: bool = False,
                 logit_counts: Optional[torch.Tensor] = None):
        q_len = _check_lengths(q_len, window)
        n = int(q_len.sum())
        check_tensor("index", index, ndim=1, dtypes=(torch.int64,), shape=(n,))
        if logit_counts is not None:
            check_tensor("logit_counts", logit_counts, ndim=1, dtypes=(torch.int32, torch.int64),
                         device=torch.device("cpu"), shape=tuple(q_len.shape))
            logit_counts = logit_counts.to(torch.int64)
            if bool((logit_counts < 0).any()) or bool((logit_counts > q_len).any()):
                fail("logit_counts", "host counts in [0, q_len] per sequence", logit_counts.tolist())
        self.q_len, self.window, self.index, self.n = q_len, window, index, n  # index: [N]
        self.per_request, self.logit_counts = bool(per_request), logit_counts

    @classmethod
    def build(cls, q_len: torch.Tensor, window: int, device, *, per_request: bool = False,
              logit_counts: Optional[torch.Tensor] = None) -> "Packing":
        """The plan for host lengths q_len [B] and a window of `window` rows,
        its index sent to `device` (one non-blocking copy from pinned memory on CUDA)."""
        index = pack_index(_check_lengths(q_len, window), window)  # [N], host
        device = torch.device(device)
        if device.type == "cuda":
            index = index.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            index = index.to(device)
        return cls(q_len, window, index, per_request=per_request, logit_counts=logit_counts)

    def segments(self) -> list:
        """Host [(start, end)] of each sequence's rows in the forward's row
        layout (packed; when dense, every q_len is the window, so the padded
        layout has the same offsets). Empty sequences are left out."""
        cu = self.cu_seqlens.tolist()
        return [(a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]

    @property
    def batch(self) -> int:
        return self.q_len.numel()

    @property
    def dense(self) -> bool:
        return self.n == 0 or self.n == self.batch * self.window

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """Host [B + 1] int64 offsets of each sequence's rows in the packed layout."""
        return torch.nn.functional.pad(torch.cumsum(self.q_len, 0), (1, 0))

    def __repr__(self) -> str:
        return f"Packing(batch={self.batch}, window={self.window}, rows={self.n}, device={self.index.device})"


def check_packing(packing: Optional[Packing], B: int, Lw: int, device: torch.device) -> None:
    """The forward's check of its `packing` argument (shapes and device; the
    values were checked when the plan was built)."""
    if packing is None:
        return
    if not isinstance(packing, Packing):
        raise TypeError(f"packing: expected None or a Packing (apd_ext.models.Packing), got {type(packing).__name__}")
    if packing.batch != B or packing.window != Lw:
        fail("packing", f"a plan for {B} sequences of a {Lw}-row window",
             f"one for {packing.batch} sequences of {packing.window} rows")
    if packing.index.device != device:
        fail("packing", f"an index on {device} (the model's device)", f"one on {packing.index.device}")
