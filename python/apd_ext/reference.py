"""Pure-PyTorch reference of every apd op, written from DESIGN.md to the
letter and computed in fp32/fp64. It is the oracle of the tests and is never
used on a hot path.
"""
from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------
# Philox4x32-10 and Gumbel noise (DESIGN.md §3)
# ---------------------------------------------------------------------------

# (section owned by the sampling work)

# ---------------------------------------------------------------------------
# Sampling core (DESIGN.md §4)
# ---------------------------------------------------------------------------

# (section owned by the sampling work)

# ---------------------------------------------------------------------------
# Masked-window attention (DESIGN.md §5)
# ---------------------------------------------------------------------------


def window_attention_mask(
    q_start: torch.Tensor, q_len: torch.Tensor, kv_len: torch.Tensor, Lq: int, Lkv: int, *, causal: bool
) -> torch.Tensor:
    """Boolean visibility mask [B, Lq, Lkv]: mask[b, j, n] is True when query
    row j of sequence b sees cache position n. Rows j >= q_len[b] see nothing."""
    dev = q_start.device
    j = torch.arange(Lq, device=dev, dtype=torch.int64)[None, :]  # [1, Lq]
    n = torch.arange(Lkv, device=dev, dtype=torch.int64)[None, None, :]  # [1, 1, Lkv]
    limit = kv_len.to(torch.int64)[:, None].expand(-1, Lq)  # [B, Lq]
    if causal:
        limit = torch.minimum(limit, q_start.to(torch.int64)[:, None] + j + 1)
    limit = torch.where(j < q_len.to(torch.int64)[:, None], limit, torch.zeros_like(limit))
    return n < limit[:, :, None]


def window_attention(
    q: torch.Tensor,  # [B, Lq, Hq, D]
    k_cache: torch.Tensor,  # [B, Lmax, Hkv, D]
    v_cache: torch.Tensor,  # [B, Lmax, Hkv, D]
    q_start: torch.Tensor,  # [B] int
    q_len: torch.Tensor,  # [B] int
    kv_len: torch.Tensor,  # [B] int
    *,
    causal: bool,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Masked-window attention with an explicit mask, computed in compute_dtype
    (fp64 by default, fp32 on request) and RETURNED in compute_dtype [B, Lq, Hq, D]
    so that tests can measure errors against it. Rows with no visible key
    (padding rows j >= q_len[b]) are zeros. No argument checking."""
    B, Lq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    Lkv = int(kv_len.max().item()) if B > 0 else 0
    qf = q.to(compute_dtype)
    kf = k_cache[:, :Lkv].to(compute_dtype).repeat_interleave(Hq // Hkv, dim=2)  # [B, Lkv, Hq, D]
    vf = v_cache[:, :Lkv].to(compute_dtype).repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale  # [B, Hq, Lq, Lkv]
    mask = window_attention_mask(q_start, q_len, kv_len, Lq, Lkv, causal=causal)[:, None]  # [B, 1, Lq, Lkv]
    s = s.masked_fill(~mask, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True) if Lkv > 0 else s.sum(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(s - row_max)  # exactly 0 where masked
    denom = p.sum(dim=-1, keepdim=True)
    p = torch.where(denom > 0, p / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(p))
    return torch.einsum("bhqk,bkhd->bqhd", p, vf)
