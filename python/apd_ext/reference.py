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

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a constant a < 2^32 and int64 b < 2^32,
    without overflowing int64 (b is split into 16-bit halves)."""
    t_lo = a * (b & 0xFFFF)          # < 2^48
    t_hi = a * (b >> 16)             # < 2^48
    mid = t_lo + ((t_hi & 0xFFFF) << 16)
    return (t_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Random123 Philox4x32-10 on int64 tensors (broadcastable) holding uint32
    values; returns the four output words as int64 tensors in [0, 2^32)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    k0, k1 = torch.as_tensor(k0, dtype=torch.int64), torch.as_tensor(k1, dtype=torch.int64)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def noise_words(seeds: torch.Tensor, steps: torch.Tensor, pos: torch.Tensor, V: int) -> torch.Tensor:
    """Raw Philox words [N, V] (int64 in [0, 2^32)) for rows with int64 seeds,
    steps and absolute positions [N] (DESIGN.md §3 counter and key layout)."""
    seeds, steps, pos = (t.to(torch.int64).reshape(-1, 1) for t in (seeds, steps, pos))
    blocks = torch.arange((V + 3) // 4, dtype=torch.int64, device=seeds.device).reshape(1, -1)
    words = philox4x32_10(blocks, pos & _MASK32, steps & _MASK32, (steps >> 32) & _MASK32,
                          seeds & _MASK32, (seeds >> 32) & _MASK32)
    return torch.stack(words, dim=-1).reshape(seeds.shape[0], -1)[:, :V]


def fma32(a: torch.Tensor, b: torch.Tensor, c) -> torch.Tensor:
    """fp32 fused multiply-add with one rounding, from fp64 ops: a * b is exact
    in fp64; the fp64 sum is made round-to-odd (nudged one fp64 ulp toward the
    exact sum whenever it is inexact and even), after which rounding to fp32
    is correct (53 >= 24 + 2 bits)."""
    a, b = a.double(), b.double()
    c = torch.as_tensor(c, dtype=torch.float64, device=a.device)
    p = a * b
    s = p + c
    bp = s - c
    err = (p - bp) + (c - (s - bp))  # TwoSum: s + err == p + c exactly
    even = (s.view(torch.int64) & 1) == 0
    nudge = (err != 0) & even
    s = torch.where(nudge, torch.nextafter(s, torch.where(err > 0, torch.inf, -torch.inf).double()), s)
    return s.float()


# log_fp32's polynomial (philox.h), highest degree first, and its ln 2 split.
_LOG_P = (0.117182411, -0.128723681, 0.108321540, -0.121898688, 0.142972738, -0.166799799,
          0.199998543, -0.249998122, 0.333333343)
_LN2_HI, _LN2_LO = 0.693145752, 1.42860677e-06


def log_fp32(x: torch.Tensor) -> torch.Tensor:
    """The fp32 natural log of philox.h (log_fp32), op for op, for positive
    normal fp32 x (the Gumbel inputs): the same bits as the kernels' noise."""
    x = x.float()
    bits = x.view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).view(torch.float32)
    big = m > 1.33333337
    m = torch.where(big, m * 0.5, m)
    e = torch.where(big, e + 1, e)
    f = m - 1.0
    p = torch.full_like(f, _LOG_P[0])
    for c in _LOG_P[1:]:
        p = fma32(p, f, torch.tensor(c, dtype=torch.float32))
    q = fma32(p, f, -0.5)
    s = f * f
    ef = e.float()
    r = fma32(s, q, fma32(ef, torch.tensor(_LN2_LO, dtype=torch.float32), f))
    return fma32(ef, torch.tensor(_LN2_HI, dtype=torch.float32), r)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, pos: torch.Tensor, V: int) -> torch.Tensor:
    """g(seed, step, p, v) = -log(-log(u)) in fp32, [N, V], with philox.h's
    log_fp32 (<= 1 ulp from the exact log; bit-identical to the kernels)."""
    x = noise_words(seeds, steps, pos, V)
    u = ((x >> 9).to(torch.float32) + 0.5) * 2.0**-23
    return -log_fp32(-log_fp32(u))

# ---------------------------------------------------------------------------
# Sampling core (DESIGN.md §4)
# ---------------------------------------------------------------------------

_REL_TIE = 1e-5  # SEMANTICS.md: near-ties / boundary masses within this are implementation-defined


def _f32(x: float) -> float:
    """A Python float rounded to fp32, as the kernels receive it."""
    return float(torch.tensor(x, dtype=torch.float32))


def _eos_tensor(eos_ids, device) -> torch.Tensor:
    if eos_ids is None:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.as_tensor(eos_ids, dtype=torch.int64, device=device).reshape(-1)


def _near(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() <= _REL_TIE * torch.clamp(scale.abs(), min=1.0)


def _kept_mask(z: torch.Tensor, top_k: int, top_p: float):
    """Default filter(z) of DESIGN.md §4 as a bool mask [N, V], plus a per-row flag set
    when the top-p cut sits within 1e-5 of the boundary (a cut the kernels may
    place one entry differently). z [N, V] fp32 with finite maxima."""
    N, V = z.shape
    vals, order = torch.sort(z, dim=-1, descending=True, stable=True)  # value desc, index asc
    cum = torch.softmax(vals.double(), dim=-1).cumsum(-1)
    top_p = _f32(top_p)
    K = top_k if 0 < top_k < V else V
    fragile = torch.zeros(N, dtype=torch.bool, device=z.device)
    n = torch.full((N,), K, dtype=torch.int64, device=z.device)
    S = cum[:, K - 1]
    if top_p < 1.0:
        T = top_p * S
        n_p = torch.clamp((cum < T[:, None]).sum(-1) + 1, max=n)
        at = cum.gather(1, (n_p - 1)[:, None])[:, 0]
        below = cum.gather(1, torch.clamp(n_p - 2, min=0)[:, None])[:, 0]
        fragile = _near(at, T, S) | ((n_p >= 2) & _near(below, T, S))
        n = n_p
    kept_sorted = torch.arange(V, device=z.device)[None, :] < n[:, None]
    return torch.zeros_like(kept_sorted).scatter(1, order, kept_sorted), fragile


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> dtype (round to nearest even) -> fp32: torch storing an fp32 result."""
    return x.to(dtype).to(torch.float32)


def official_top_p_threshold(top_p: float, dtype: torch.dtype) -> float:
    """Smallest C with round_dtype(C) > round_dtype(top_p): the released code's
    `cumulative_probs > top_p` in the logits' dtype (sampling_row.h)."""
    ibits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    tp = torch.tensor(top_p, dtype=dtype)
    b = tp.view(ibits)
    nxt = (b + 1).view(dtype)
    mid = 0.5 * (float(tp) + float(nxt))  # exact in fp64
    return mid if int(b) & 1 else math.nextafter(mid, math.inf)


def _kept_mask_official(z: torch.Tensor, top_k: int, top_p: float, dtype: torch.dtype):
    """compat="official" filter as a bool mask [N, V] plus fragile flags [N].
    z [N, V] fp32 holds values already rounded to dtype. Top-p: probabilities
    are the dtype-rounded softmax, the kept prefix ends at the first entry whose
    cumulative probability rounds above round(top_p). Top-k: every entry >= the
    k-th largest value (ties kept). The kept set is the shorter prefix."""
    N, V = z.shape
    vals, order = torch.sort(z, dim=-1, descending=True, stable=True)
    n = torch.full((N,), V, dtype=torch.int64, device=z.device)
    fragile = torch.zeros(N, dtype=torch.bool, device=z.device)
    if _f32(top_p) < 1.0:
        e = torch.exp(vals.double() - vals[:, :1].double())
        e = torch.where(vals.double() - vals[:, :1].double() > -48.0, e, 0.0)  # kernels' mass floor
        p = e / e.sum(-1, keepdim=True)
        thr = official_top_p_threshold(top_p, dtype)

        def count(pp):  # kept count for probabilities pp [N, V] (fp64, exact)
            cum = round_to(pp.float(), dtype).double().cumsum(-1)
            return torch.clamp((cum < thr).sum(-1) + 1, max=V), cum

        n, cum = count(p)
        # The kernels round fp32 exp / fp32 sum (a few fp32 ulps off the exact p)
        # and sum in another order: a cut that moves under such changes is fragile.
        n_lo, _ = count(p * (1 - 1e-6))
        n_hi, _ = count(p * (1 + 1e-6))
        at = cum.gather(1, (n - 1)[:, None])[:, 0]
        below = cum.gather(1, torch.clamp(n - 2, min=0)[:, None])[:, 0]
        fragile = (n_lo != n) | (n_hi != n) | _near(at, torch.full_like(at, thr), at) \
            | ((n >= 2) & _near(below, torch.full_like(at, thr), at))
    if 0 < top_k < V:
        n_k = (vals >= vals[:, top_k - 1:top_k]).sum(-1)
        n = torch.minimum(n, n_k)
    kept_sorted = torch.arange(V, device=z.device)[None, :] < n[:, None]
    return torch.zeros_like(kept_sorted).scatter(1, order, kept_sorted), fragile


def _argmax_rows(score: torch.Tensor, exact_ties_fragile: bool = False):
    """Lowest-index argmax per row, with a flag for rows whose best two scores
    are within 1e-5 relative. Exactly equal scores are a deterministic tie
    (lowest index) unless the scores carry rounding of their own
    (exact_ties_fragile, e.g. a mixture shifted by an fp32 lse)."""
    ids = score.argmax(-1)  # first maximal index
    top = score.topk(min(2, score.shape[-1]), dim=-1).values
    fragile = torch.zeros(score.shape[0], dtype=torch.bool, device=score.device)
    if top.shape[-1] == 2:
        fragile = torch.isfinite(top[:, 1]) & _near(top[:, 0], top[:, 1], top[:, 0])
        if not exact_ties_fragile:
            fragile &= top[:, 0] != top[:, 1]
    return ids, fragile


def _sample_rows(l, seeds, steps, pos, temperature, top_k, top_p, official, exact_ties_fragile=False,
                 dtype=torch.float32):
    """sample(l) of DESIGN.md §4 for independent rows l [N, V] (fp32) with their
    noise coordinates [N]; returns ids [N] int64 (-1 for bad rows) and the
    fragile flags [N] (near-ties the kernels may resolve differently).
    official: the released code's arithmetic in the logits' dtype `dtype`."""
    tau = torch.tensor(_f32(temperature), dtype=torch.float32)
    if float(tau) == 0.0:
        bad = ~torch.isfinite(l.max(-1).values)  # torch max propagates NaN
        ids, fragile = _argmax_rows(torch.where(bad[:, None], 0.0, l), exact_ties_fragile)
        return torch.where(bad, -1, ids), fragile & ~bad
    z = l / tau  # true fp32 division
    if official:  # `logits / temperature` stored in the logits' dtype
        z = round_to(z, dtype)
    bad = ~torch.isfinite(z.max(-1).values)
    z = torch.where(bad[:, None], 0.0, z)
    if official:
        kept, fragile = _kept_mask_official(z, top_k, top_p, dtype)
    else:
        kept, fragile = _kept_mask(z, top_k, top_p)
    g = gumbel_noise(seeds, steps, pos, l.shape[-1]).to(l.device)
    score = (z / tau if official else z) + g
    ids, near = _argmax_rows(torch.where(kept, score, float("-inf")), exact_ties_fragile)
    return torch.where(bad, -1, ids), (fragile | near) & ~bad


def _ban(x: torch.Tensor, banned) -> torch.Tensor:
    """x [..., V] with the banned ids [start, end) set to -inf (SEMANTICS.md "Banned ids")."""
    if banned is None or banned[0] >= banned[1]:
        return x
    x = x.clone()
    x[..., banned[0] : banned[1]] = float("-inf")
    return x


def _row_coords(pos_start, seeds, steps, M):
    B = pos_start.shape[0]
    pos = (pos_start.to(torch.int64)[:, None] + torch.arange(M, device=pos_start.device)).reshape(-1)
    rep = lambda t: t.to(torch.int64)[:, None].expand(B, M).reshape(-1)  # noqa: E731
    return pos, rep(seeds), rep(steps)


def _valid_rows(valid_len, M):
    return torch.arange(M, device=valid_len.device)[None, :] < valid_len.to(torch.int64)[:, None]


def _resolve_modes(acceptance, compat):
    official = compat == "official"
    if acceptance is None:
        acceptance = "argmax" if official else "coupled"
    return acceptance, official


def sample_draft_impl(logits, pos_start, valid_len, seeds, steps, *, temperature=0.0, top_k=0,
                      top_p=1.0, compat=None, banned=None):
    """sample_draft plus the fragile flags [B, M] (see _sample_rows)."""
    B, M, V = logits.shape
    pos, sd, st = _row_coords(pos_start, seeds, steps, M)
    ids, fragile = _sample_rows(_ban(logits.float(), banned).reshape(B * M, V), sd, st, pos, temperature, top_k,
                                top_p, compat == "official", dtype=logits.dtype)
    valid = _valid_rows(valid_len, M)
    return torch.where(valid, ids.view(B, M), -1), fragile.view(B, M) & valid


def sample_draft(logits, pos_start, valid_len, seeds, steps, *, temperature=0.0, top_k=0, top_p=1.0,
                 compat=None, banned=None):
    """Reference of apd.sample_draft: draft [B, M] int64 = sample(logits) per row
    (DESIGN.md §4, Op 1); rows >= valid_len and bad rows are -1. banned: None or
    (start, end), ids [start, end) read as -inf."""
    return sample_draft_impl(logits, pos_start, valid_len, seeds, steps, temperature=temperature,
                             top_k=top_k, top_p=top_p, compat=compat, banned=banned)[0]


def _accept_scan(draft, target, valid_len, eos_ids, V):
    B, M = draft.shape
    i = torch.arange(M, device=draft.device)[None, :]
    match = (target >= 0) & (draft == target) & (draft < V)
    match[:, 0] = True
    match &= i < valid_len.to(torch.int64)[:, None]
    n = torch.cumprod(match.to(torch.int64), dim=-1).sum(-1)
    eos = torch.isin(draft, _eos_tensor(eos_ids, draft.device)) & (i < n[:, None])
    first = torch.where(eos.any(-1), eos.to(torch.int64).argmax(-1) + 1, n)
    return torch.minimum(n, first)


def accept_prefix(draft, target, valid_len, eos_ids=None):
    """Reference of apd.accept_prefix: n_accept [B] int64 (DESIGN.md §4, Op 3)."""
    return _accept_scan(draft.to(torch.int64), target.to(torch.int64), valid_len, eos_ids, 2**62)


def mixture_accept_impl(dllm_logits, ar_logits, draft, pos_start, valid_len, seeds, steps, *, R,
                        temperature=0.0, top_k=0, top_p=1.0, eos_ids=None, acceptance=None,
                        compat=None, banned=None):
    """mixture_accept plus the fragile flags [B, M] of the target rows."""
    acceptance, official = _resolve_modes(acceptance, compat)
    B, M, V_D = dllm_logits.shape
    V = min(V_D, ar_logits.shape[-1])
    # Banned ids are -inf in both rows (so neither lse counts them) and in the
    # argmax mixture (set after mixing: 0 * -inf would be NaN at R = 0 or 1).
    d = _ban(dllm_logits.float(), banned)
    a = _ban(ar_logits.float(), banned)
    R_t = torch.tensor(_f32(R), dtype=torch.float32)
    if official:  # the Python scalar 1 - R (fp64), as torch hands it to the op (fp32)
        one_minus_R = torch.tensor(_f32(1.0 - float(R)), dtype=torch.float32)
    else:
        one_minus_R = torch.tensor(1.0, dtype=torch.float32) - R_t  # fp32, as the kernels
    if acceptance == "coupled":
        if float(R_t) == 1.0:  # shift invariance: m = d exactly (sampling_row.h)
            m = d[..., :V]
        elif float(R_t) == 0.0:
            m = a[..., :V]
        else:
            lse_d = torch.logsumexp(d.double(), dim=-1).float()[..., None]
            lse_a = torch.logsumexp(a.double(), dim=-1).float()[..., None]
            m = R_t * (d[..., :V] - lse_d) + one_minus_R * (a[..., :V] - lse_a)
        pos, sd, st = _row_coords(pos_start, seeds, steps, M)
        ids, fragile = _sample_rows(m.reshape(B * M, V), sd, st, pos, temperature, top_k, top_p,
                                    official, exact_ties_fragile=0.0 < float(R_t) < 1.0)
    else:
        if official:  # each torch op of the released code rounds to the logits' dtype
            dt = dllm_logits.dtype
            w = round_to(round_to(R_t * d[..., :V], dt) + round_to(one_minus_R * a[..., :V], dt), dt)
        else:
            w = R_t * d[..., :V] + one_minus_R * a[..., :V]
        w = _ban(w, banned)
        w = w.reshape(B * M, V)
        bad = ~torch.isfinite(w.max(-1).values)
        ids, fragile = _argmax_rows(torch.where(bad[:, None], 0.0, w))
        ids, fragile = torch.where(bad, -1, ids), fragile & ~bad
    valid = _valid_rows(valid_len, M)
    target = torch.where(valid, ids.view(B, M), -1)
    n = _accept_scan(draft.to(torch.int64), target, valid_len, eos_ids, V)
    return target, n, fragile.view(B, M) & valid


def mixture_accept(dllm_logits, ar_logits, draft, pos_start, valid_len, seeds, steps, *, R,
                   temperature=0.0, top_k=0, top_p=1.0, eos_ids=None, acceptance=None, compat=None,
                   banned=None):
    """Reference of apd.mixture_accept: (target [B, M] int64, n_accept [B] int64)
    (DESIGN.md §4, Op 2). banned: None or (start, end), ids [start, end) read as
    -inf in both rows and the target."""
    target, n, _ = mixture_accept_impl(dllm_logits, ar_logits, draft, pos_start, valid_len, seeds,
                                       steps, R=R, temperature=temperature, top_k=top_k,
                                       top_p=top_p, eos_ids=eos_ids, acceptance=acceptance,
                                       compat=compat, banned=banned)
    return target, n

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
