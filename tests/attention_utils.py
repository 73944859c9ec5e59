"""Shared helpers of the window_attention tests (CPU and CUDA).

The tolerance follows FlashAttention's tests: the kernel's max error against
the fp64 reference may be at most twice the error of PyTorch's own
scaled_dot_product_attention run in the same dtype on the same inputs (with an
explicit mask), plus a rounding term: twice the spacing of the dtype near 0.3
(FlashAttention's `2 * (out_ref + 0.3 - 0.3 - out_ref).abs().max()`).
Padding rows must be exactly zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from apd_ext import reference


# name -> make_case kwargs shared by the CPU and CUDA tests. Lq, Lmax, Hq, Hkv,
# D and the per-sequence (q_start, q_len, kv_len) exercise one or more edge
# cases each. Order matters: the tests seed each case by its index.
COMMON_CASES = {
    # odd lengths, kv_len == q_start + q_len, GQA 2, D 64
    "odd_tight_gqa2": dict(Lq=37, Lmax=101, Hq=4, Hkv=2, D=64, q_start=[50], q_len=[37], kv_len=[87]),
    # window at position 0 (kv_len larger), padding rows (q_len < Lq, one q_len 0), ragged, GQA 7, D 128
    "pos0_pad_gqa7": dict(
        Lq=40, Lmax=200, Hq=7, Hkv=1, D=128, q_start=[0, 130, 3], q_len=[33, 17, 0], kv_len=[70, 147, 3]
    ),
    # GQA 1, odd head dim 40, ragged with a single-row window, key-block edges (64, 65, 128, 261)
    "gqa1_d40_edges": dict(
        Lq=19, Lmax=261, Hq=3, Hkv=3, D=40, q_start=[0, 5, 109, 45], q_len=[19, 1, 19, 19], kv_len=[64, 65, 128, 261]
    ),
    # non-contiguous, misaligned q (strided slice; mma falls back to simple) and k/v views of one
    # packed buffer, Dream-like heads
    "strided_dream": dict(
        Lq=23, Lmax=150, Hq=28, Hkv=4, D=128, q_start=[100, 7], q_len=[23, 11], kv_len=[150, 18],
        noncontig_q=True, packed_kv=True,
    ),
    # sharp softmax (large scores) over several key blocks, int32 lengths, odd D
    "sharp_int32_d72": dict(
        Lq=9, Lmax=300, Hq=6, Hkv=2, D=72, q_start=[250, 0], q_len=[9, 9], kv_len=[300, 200],
        q_gain=6.0, len_dtype=torch.int32,
    ),
}


@dataclass
class WindowCase:
    """Inputs of one window_attention call."""

    q: torch.Tensor  # [B, Lq, Hq, D]
    k_cache: torch.Tensor  # [B, Lmax, Hkv, D]
    v_cache: torch.Tensor  # [B, Lmax, Hkv, D]
    q_start: torch.Tensor  # [B]
    q_len: torch.Tensor  # [B]
    kv_len: torch.Tensor  # [B]

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.q_start, self.q_len, self.kv_len)

    def to(self, device) -> "WindowCase":
        return WindowCase(*(t.to(device) for t in self.args()))


def make_case(
    *,
    Lq: int,
    Lmax: int,
    Hq: int,
    Hkv: int,
    D: int,
    q_start,
    q_len,
    kv_len,
    dtype=torch.float32,
    device="cpu",
    noncontig_q: bool = False,
    packed_kv: bool = False,
    q_gain: float = 1.0,
    len_dtype=torch.int64,
    seed: int = 0,
) -> WindowCase:
    """Random normal inputs (fixed seed, drawn in fp32 on the CPU, then cast and
    moved). noncontig_q: q is a strided slice of a bigger tensor (stride 1
    along D kept). packed_kv: k/v are views of one [B, Lmax, 2, Hkv, D]
    buffer. q_gain scales q to sharpen the softmax."""
    g = torch.Generator().manual_seed(seed)
    B = len(q_len)
    if noncontig_q:
        big = torch.randn(B, Lq + 3, 2 * Hq, D + 5, generator=g)
        q = big.to(dtype).to(device)[:, 2 : 2 + Lq, 1::2, 3 : 3 + D]
    else:
        q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype).to(device)
    q = q * q_gain if q_gain != 1.0 else q
    if packed_kv:
        kv = torch.randn(B, Lmax, 2, Hkv, D, generator=g).to(dtype).to(device)
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        k = torch.randn(B, Lmax, Hkv, D, generator=g).to(dtype).to(device)
        v = torch.randn(B, Lmax, Hkv, D, generator=g).to(dtype).to(device)

    def ints(x):
        return torch.tensor(x, dtype=len_dtype, device=device)

    return WindowCase(q, k, v, ints(q_start), ints(q_len), ints(kv_len))


def sdpa_window_attention(q, k_cache, v_cache, q_start, q_len, kv_len, *, causal, scale=None):
    """torch SDPA in q's dtype with the explicit mask; same contract as the op
    (rows with no visible key are zeros). The baseline of the tolerance."""
    B, Lq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    Lkv = int(kv_len.max().item()) if B > 0 else 0
    if Lkv == 0:
        return torch.zeros(B, Lq, Hq, D, dtype=q.dtype, device=q.device)
    mask = reference.window_attention_mask(q_start, q_len, kv_len, Lq, Lkv, causal=causal)  # [B, Lq, Lkv]
    empty = ~mask.any(dim=-1)  # [B, Lq]: give those rows every key, zero them afterwards
    mask = mask | empty[:, :, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k_cache[:, :Lkv].transpose(1, 2),
        v_cache[:, :Lkv].transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=Hq != Hkv,
    ).transpose(1, 2)
    return out.masked_fill(empty[:, :, None, None], 0)


def _spacing_at_0_3(dtype: torch.dtype) -> float:
    """Distance between adjacent values of dtype near 0.3 (FlashAttention's choice)."""
    x = torch.tensor(0.3, dtype=dtype)
    return (x + 0.3 - 0.3 - x).abs().item() or torch.finfo(dtype).eps / 4


def attention_errors(out, q, k_cache, v_cache, q_start, q_len, kv_len, *, causal, scale=None) -> dict:
    """Max abs errors over the valid rows against the fp64 reference: of `out`
    (err), of SDPA in q's dtype (err_sdpa); the rounding term (round); the
    largest magnitude found in the padding rows of `out` (pad, must be 0)."""
    ref = reference.window_attention(q, k_cache, v_cache, q_start, q_len, kv_len, causal=causal, scale=scale)
    sdpa = sdpa_window_attention(q, k_cache, v_cache, q_start, q_len, kv_len, causal=causal, scale=scale)
    Lq = q.shape[1]
    valid = torch.arange(Lq, device=q.device)[None, :] < q_len.to(torch.int64)[:, None]  # [B, Lq]
    v4 = valid[:, :, None, None]

    def max_err(x):
        return ((x.double() - ref).abs() * v4).amax().item() if x.numel() else 0.0

    pad = (out.double().abs() * ~v4).amax().item() if out.numel() else 0.0
    return {
        "err": max_err(out),
        "err_sdpa": max_err(sdpa),
        "round": 2.0 * _spacing_at_0_3(q.dtype),
        "pad": pad,
    }


def assert_attention_close(out, q, k_cache, v_cache, q_start, q_len, kv_len, *, causal, scale=None, what=""):
    """FlashAttention's criterion: err <= 2 * err_sdpa + round; padding rows exactly 0."""
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device, (out.shape, out.dtype)
    e = attention_errors(out, q, k_cache, v_cache, q_start, q_len, kv_len, causal=causal, scale=scale)
    assert math.isfinite(e["err"]), f"{what}: non-finite output {e}"
    assert e["pad"] == 0.0, f"{what}: padding rows not zero {e}"
    assert e["err"] <= 2.0 * e["err_sdpa"] + e["round"], f"{what}: error too large {e}"
    return e


# ---------------------------------------------------------------------------
# NaN propagation (docs/SEMANTICS.md "Attention"): a NaN in a valid row's q, or
# in a key or value the row sees, makes the whole output row NaN, as SDPA does;
# keys the row does not see (beyond kv_len, causally masked) never reach it;
# padding rows stay zero.
# ---------------------------------------------------------------------------
NAN_CASE = dict(Lq=21, Lmax=101, Hq=4, Hkv=2, q_start=[50, 0], q_len=[21, 12], kv_len=[87, 30])


def nan_rows(q, k_cache, v_cache, q_start, q_len, kv_len, *, causal) -> torch.Tensor:
    """[B, Lq, Hq] bool: the rows the rule makes NaN (fp64 mask of the reference)."""
    B, Lq, Hq, D = q.shape
    Lmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    mask = reference.window_attention_mask(q_start, q_len, kv_len, Lq, Lmax, causal=causal)  # [B, Lq, Lmax]
    kv_bad = (k_cache.isnan() | v_cache.isnan()).any(-1).repeat_interleave(Hq // Hkv, dim=2)  # [B, Lmax, Hq]
    sees_bad = (mask[:, :, :, None] & kv_bad[:, None]).any(2)  # [B, Lq, Hq]
    valid = (torch.arange(Lq, device=q.device)[None, :] < q_len.to(torch.int64)[:, None])[:, :, None]
    return valid & (q.isnan().any(-1) | sees_bad)


def nan_reference(q, k_cache, v_cache, q_start, q_len, kv_len, *, causal) -> torch.Tensor:
    """fp64 reference with the NaN rule: the reference on the inputs with NaNs
    zeroed (they reach no other row), NaN on the rows that see one."""
    ref = reference.window_attention(q.nan_to_num(0.0), k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0), q_start,
                                     q_len, kv_len, causal=causal)
    rows = nan_rows(q, k_cache, v_cache, q_start, q_len, kv_len, causal=causal)
    return ref.masked_fill(rows[..., None], float("nan"))


def nan_injections(c: WindowCase, causal: bool) -> list[tuple[str, WindowCase]]:
    """Copies of c (NAN_CASE shapes) with NaNs placed: in a valid q row and a
    padding q row; in a key every row of sequence 0 sees; in a value that the
    causal rows see only from row 10 on (all rows when bidirectional: key 60 =
    q_start + 10); in keys and values beyond kv_len (seen by no row)."""
    def inject(**where):
        t = {n: getattr(c, n).clone() for n in ("q", "k_cache", "v_cache")}
        for name, idx in where.items():
            for i in idx:
                t[name][i] = float("nan")
        return WindowCase(t["q"], t["k_cache"], t["v_cache"], c.q_start, c.q_len, c.kv_len)

    return [
        ("q", inject(q=[(0, 5, 1, 7), (1, 15, 0, 3)])),  # (1, 15): q_len 12, a padding row
        ("visible_key", inject(k_cache=[(0, 40, 1, 3)])),
        ("visible_value", inject(v_cache=[(0, 60, 0, 9)])),
        ("invisible_key", inject(k_cache=[(0, 95, 0, 1), (1, 50, 1, 0)], v_cache=[(0, 99, 1, 2), (1, 30, 0, 5)])),
    ]


def assert_nan_rule(out, clean, c: WindowCase, *, causal, what=""):
    """out (on the injected case c) against the NaN reference: whole rows NaN
    exactly where it has them, and every other row bit-identical to `clean`,
    the same kernel's output without the NaNs (itself checked against the
    fp64 reference by the caller)."""
    ref = nan_reference(*c.args(), causal=causal)
    rows = ref.isnan().any(-1)  # [B, Lq, Hq]
    o = out.double()
    assert o[rows].isnan().all(), f"{what}: a row that sees a NaN is not all NaN"
    assert not o[~rows].isnan().any(), f"{what}: NaN leaked into a row that sees none"
    assert torch.equal(out[~rows], clean[~rows]), f"{what}: a row that sees no NaN changed"
    return int(rows.sum())
