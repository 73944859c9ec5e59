"""Thin Python wrappers over the apd ops: argument validation with clear
errors, docstrings, and a fake (meta) kernel per op so that torch.compile and
CUDA graphs can trace them. The kernels are registered by apd_ext._C under
torch.ops.apd; semantics are those of ../shared/DESIGN.md.
"""
from __future__ import annotations

import math

import torch

from apd_ext import _C  # noqa: F401  (registers torch.ops.apd.*)
from apd_ext._validate import (  # noqa: F401
    FLOAT_DTYPES,
    INT_DTYPES,
    check_batch_vector,
    check_choice,
    check_range,
    check_tensor,
    fail,
)

__all__ = ["sample_draft", "mixture_accept", "accept_prefix", "window_attention"]

# ---------------------------------------------------------------------------
# Sampling core (DESIGN.md §4): sample_draft, mixture_accept, accept_prefix
# ---------------------------------------------------------------------------

# (section owned by the sampling work)

# ---------------------------------------------------------------------------
# Masked-window attention (DESIGN.md §5): window_attention
# ---------------------------------------------------------------------------


def _check_window_lengths(q_start, q_len, kv_len, Lq: int, Lmax: int) -> None:
    """Value checks of the [B] length vectors. They read the values on the
    host: free on the CPU, one device->host copy (a stream sync) on CUDA."""
    host = torch.stack([q_start.to(torch.int64), q_len.to(torch.int64), kv_len.to(torch.int64)]).cpu()
    for b, (qs, ql, kl) in enumerate(zip(*host.tolist())):
        if ql < 0 or ql > Lq:
            fail("q_len", f"values in [0, Lq={Lq}]", f"q_len[{b}] = {ql}")
        if qs < 0:
            fail("q_start", "values >= 0", f"q_start[{b}] = {qs}")
        if kl < 0 or kl > Lmax:
            fail("kv_len", f"values in [0, Lmax={Lmax}] (k_cache.shape[1])", f"kv_len[{b}] = {kl}")
        if qs + ql > kl:
            fail(
                "kv_len",
                "q_start + q_len <= kv_len (the window's K/V must be in the cache)",
                f"q_start[{b}] + q_len[{b}] = {qs} + {ql} > kv_len[{b}] = {kl}",
            )


def window_attention(
    q: torch.Tensor,  # [B, Lq, Hq, D]
    k_cache: torch.Tensor,  # [B, Lmax, Hkv, D]
    v_cache: torch.Tensor,  # [B, Lmax, Hkv, D]
    q_start: torch.Tensor,  # [B] int32/int64
    q_len: torch.Tensor,  # [B] int32/int64
    kv_len: torch.Tensor,  # [B] int32/int64
    *,
    causal: bool,
    scale: float | None = None,
    check_lengths: bool = True,
) -> torch.Tensor:
    """Attention of a window of queries over a KV cache, ragged per sequence.

    Query row j < q_len[b] of sequence b sits at absolute position
    q_start[b] + j and attends to cache positions [0, kv_len[b])
    (causal=False, the dLLM window) or [0, min(kv_len[b], q_start[b] + j + 1))
    (causal=True, the AR verifier). Rows j >= q_len[b] are zeros. Query head h
    reads kv head h // (Hq // Hkv). The caller has already written the
    window's K/V into the caches at [q_start, q_start + q_len).

    q, k_cache, v_cache: fp32, bf16 or fp16, one dtype, one device; any strides
    (a copy is made only when the stride along D is not 1). scale defaults to
    1/sqrt(D). Returns a contiguous [B, Lq, Hq, D] tensor in q's dtype.

    check_lengths=True validates the length VALUES (0 <= q_len <= Lq,
    q_start >= 0, q_start + q_len <= kv_len <= Lmax) on the host; on CUDA
    that is one device->host copy, i.e. a stream synchronisation, and it is
    skipped under torch.compile. Pass False on a CUDA hot path (or in CUDA
    graphs) when the lengths are known to be valid: the kernels trust them.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    device = q.device
    if device.type not in ("cpu", "cuda"):
        fail("q", "a tensor on cpu or cuda", f"one on {device}")
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=device)
    B, Lq, Hq, D = q.shape
    Lmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    if D < 1:
        fail("q", "a head dim (last size) >= 1", D)
    if k_cache.shape[0] != B:
        fail("k_cache", f"batch size {B} (q's)", k_cache.shape[0])
    if k_cache.shape[3] != D:
        fail("k_cache", f"head dim {D} (q's)", k_cache.shape[3])
    if Hkv < 1 or Hq % Hkv != 0:
        fail("k_cache", f"a number of kv heads that divides q's {Hq} heads", f"{Hkv} kv heads (mismatched heads)")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        fail("v_cache", f"k_cache's shape {list(k_cache.shape)}", list(v_cache.shape))
    for name, t in (("q_start", q_start), ("q_len", q_len), ("kv_len", kv_len)):
        check_batch_vector(name, t, B, device)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError(f"scale: expected a number or None, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            fail("scale", "a finite number > 0", scale)
    if check_lengths and not torch.compiler.is_compiling():
        _check_window_lengths(q_start, q_len, kv_len, Lq, Lmax)
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    return torch.ops.apd.window_attention(q, k_cache, v_cache, q_start, q_len, kv_len, causal, float(scale))


@torch.library.register_fake("apd::window_attention")
def _window_attention_fake(q, k_cache, v_cache, q_start, q_len, kv_len, causal, scale):
    torch._check(q.dim() == 4 and k_cache.dim() == 4, lambda: "window_attention: q and k_cache must be 4-D")
    torch._check(k_cache.shape == v_cache.shape, lambda: "window_attention: k_cache and v_cache shapes differ")
    torch._check(q.shape[2] % k_cache.shape[2] == 0, lambda: "window_attention: Hq must be a multiple of Hkv")
    return q.new_empty(q.shape)
