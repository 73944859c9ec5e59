"""Thin Python wrappers over the apd ops: argument validation with clear
errors, docstrings, and a fake (meta) kernel per op so that torch.compile and
CUDA graphs can trace them. The kernels are registered by apd_ext._C under
torch.ops.apd; semantics are those of ../shared/DESIGN.md.
"""
from __future__ import annotations

import math

import torch

from apd_ext._build_info import check_device, load_extension
from apd_ext._validate import (  # noqa: F401
    FLOAT_DTYPES,
    INT_DTYPES,
    check_batch_vector,
    check_choice,
    check_range,
    check_tensor,
    fail,
)

_C = load_extension()  # registers torch.ops.apd.*; one clear error if built against another torch

__all__ = ["sample_draft", "mixture_accept", "accept_prefix", "window_attention"]


def _check_build(device: torch.device) -> None:
    """Before the first dispatch on a CUDA device: one clear error when this build
    has no kernels for it (CPU-only, or no SASS/PTX for its capability) instead of
    the dispatcher's or the driver's "no kernel image". Cached per device."""
    if device.type == "cuda" and not torch.compiler.is_compiling():
        check_device(device)

# ---------------------------------------------------------------------------
# Sampling core (DESIGN.md §4): sample_draft, mixture_accept, accept_prefix
# ---------------------------------------------------------------------------

def _check_number(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        fail(name, "a finite number", value)
    return float(value)


def _check_sampler(temperature, top_k, top_p) -> tuple:
    temperature = _check_number("temperature", temperature)
    if temperature < 0:
        fail("temperature", "a value >= 0 (0 = argmax)", temperature)
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise TypeError(f"top_k: expected an int (<= 0 = off), got {type(top_k).__name__}")
    top_p = _check_number("top_p", top_p)
    if not (0.0 < top_p <= 1.0):
        fail("top_p", "a value in (0, 1] (1 = off)", top_p)
    return temperature, top_k, top_p


def _check_compat(compat) -> str:
    check_choice("compat", compat, (None, "official"))
    return compat or ""


# Per-row settings: a [B] tensor in place of a scalar argument gives every row
# its own value (one call serves rows that differ, e.g. the Engine's requests).
# name -> (dtypes, the scalar the op receives in its place, a value check).
_ROW_ARGS = {
    "temperature": ((torch.float32,), 0.0, lambda x: math.isfinite(x) and x >= 0, "values >= 0 (0 = argmax)"),
    "top_k": (INT_DTYPES, 0, lambda x: True, ""),
    "top_p": ((torch.float32,), 1.0, lambda x: 0.0 < x <= 1.0, "values in (0, 1] (1 = off)"),
    "R": ((torch.float32, torch.float64), 0.0, lambda x: 0.0 <= x <= 1.0, "values in [0, 1]"),
    "compat": (INT_DTYPES, "", lambda x: x in (0, 1), 'values 0 (default) or 1 ("official")'),
    "acceptance": (INT_DTYPES, "coupled", lambda x: x in (0, 1), 'values 0 ("coupled") or 1 ("argmax")'),
}


def _split_rows(B: int, device, args: dict) -> tuple:
    """args: name -> value (a scalar or a [B] tensor). Returns (scalars, rows):
    the scalar each argument passes to the op (a placeholder where a tensor
    stands in), and name -> [B] tensor for the per-row ones (shape, dtype and
    device checked here; values by _check_row_values)."""
    scalars, rows = dict(args), {}
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            dtypes, placeholder = _ROW_ARGS[name][:2]
            check_tensor(name, value, ndim=1, dtypes=dtypes, device=device, shape=(B,))
            scalars[name], rows[name] = placeholder, value
    return scalars, rows


def _check_row_values(rows: dict, official_needs_argmax: bool = False, compat=None, acceptance=None) -> None:
    """Values of the per-row tensors (check_lengths convention: read on the
    host, free on the CPU, one device->host copy each on CUDA). With
    official_needs_argmax: a row under compat="official" must have
    acceptance="argmax" (the scalar compat / acceptance stand in for a missing tensor)."""
    host = {name: t.cpu().tolist() for name, t in rows.items()}
    for name, values in host.items():
        ok, expected = _ROW_ARGS[name][2], _ROW_ARGS[name][3]
        for b, x in enumerate(values):
            if not ok(x):
                fail(name, expected, f"{name}[{b}] = {x}")
    if official_needs_argmax and ("compat" in host or "acceptance" in host):
        B = len(next(iter(host.values())))
        off = host.get("compat", [int(compat == "official")] * B)
        arg = host.get("acceptance", [int(acceptance == "argmax")] * B)
        for b in range(B):
            if off[b] and not arg[b]:
                fail("acceptance", 'argmax (1) on rows with compat="official" (1)',
                     f"acceptance[{b}] = 0 with compat[{b}] = 1")


def _check_logits(name: str, t, *, dtypes=FLOAT_DTYPES, device=None) -> torch.Tensor:
    check_tensor(name, t, ndim=3, dtypes=dtypes, device=device)
    if t.device.type not in ("cpu", "cuda"):
        fail(name, "a tensor on cpu or cuda", f"one on {t.device}")
    if t.shape[2] < 1:
        fail(name, "a vocabulary (last) dimension >= 1", list(t.shape))
    _check_build(t.device)
    return t


def _check_row_vectors(B: int, device, pos_start, valid_len, seeds, steps) -> None:
    check_batch_vector("pos_start", pos_start, B, device)
    check_batch_vector("valid_len", valid_len, B, device)
    check_tensor("seeds", seeds, ndim=1, dtypes=(torch.int64,), device=device, shape=(B,))
    check_batch_vector("steps", steps, B, device)


def _check_valid_len_values(valid_len: torch.Tensor, M: int) -> None:
    """0 <= valid_len <= M, read on the host: free on the CPU, one device->host
    copy (a stream sync) on CUDA."""
    for b, n in enumerate(valid_len.to(torch.int64).cpu().tolist()):
        if not 0 <= n <= M:
            fail("valid_len", f"values in [0, M={M}]", f"valid_len[{b}] = {n}")


def _eos_tensor(eos_ids, device, B: int | None = None) -> torch.Tensor:
    """eos_ids (None, an int, a list of ints, or an int tensor [E], or [B, E]:
    per row, padded with -1) as int64 [E] / [B, E] on `device`."""
    if eos_ids is None:
        return torch.empty(0, dtype=torch.int64, device=device)
    if isinstance(eos_ids, torch.Tensor):
        if eos_ids.dim() == 2 and B is not None:
            check_tensor("eos_ids", eos_ids, ndim=2, dtypes=INT_DTYPES, device=device, shape=(B, None))
        else:
            check_tensor("eos_ids", eos_ids, ndim=1, dtypes=INT_DTYPES, device=device)
        return eos_ids.to(torch.int64)
    if isinstance(eos_ids, int) and not isinstance(eos_ids, bool):
        eos_ids = [eos_ids]
    if not isinstance(eos_ids, (list, tuple)) or not all(
        isinstance(e, int) and not isinstance(e, bool) for e in eos_ids
    ):
        raise TypeError(f"eos_ids: expected None, an int, a list of ints or an int64 tensor, got {eos_ids!r}")
    return torch.tensor(list(eos_ids), dtype=torch.int64, device=device)


def _check_banned(banned) -> tuple:
    """banned: None (no banned ids) or (start, end) ints, 0 <= start <= end: the ids
    [start, end) read as logit -inf (docs/SEMANTICS.md "Banned ids")."""
    if banned is None:
        return 0, 0
    if (not isinstance(banned, (tuple, list)) or len(banned) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in banned)):
        raise TypeError(f"banned: expected None or a (start, end) pair of ints, got {banned!r}")
    start, end = banned
    if not 0 <= start <= end:
        fail("banned", "a range (start, end) with 0 <= start <= end", banned)
    return int(start), int(end)


def _check_lengths_now(check_lengths: bool) -> bool:
    return check_lengths and not torch.compiler.is_compiling()


def sample_draft(
    logits: torch.Tensor,  # [B, M, V] fp32/bf16/fp16
    pos_start: torch.Tensor,  # [B] int32/int64
    valid_len: torch.Tensor,  # [B] int32/int64
    seeds: torch.Tensor,  # [B] int64
    steps: torch.Tensor,  # [B] int32/int64
    *,
    temperature: float | torch.Tensor = 0.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    compat: str | None | torch.Tensor = None,
    banned: tuple[int, int] | None = None,
    check_lengths: bool = True,
) -> torch.Tensor:
    """Draft one token per masked row from the dLLM marginals (DESIGN.md §4, Op 1).

    Row i of sequence b sits at absolute position pos_start[b] + i. With
    temperature 0 the draft is the argmax (lowest index on ties); otherwise it
    is the argmax over filter(logits / temperature) of
    logits / temperature + g(seeds[b], steps[b], position, v), the Gumbel noise
    of DESIGN.md §3 (top_k <= 0 and top_p = 1 switch the filter off).
    compat="official" reproduces the released code's arithmetic in the
    logits' own dtype (l / temperature rounded to it, top-p from the rounded
    softmax, top-p before top-k, top-k keeping ties, temperature applied twice
    in the score; docs/SEMANTICS.md).

    Returns draft [B, M] int64; rows i >= valid_len[b] and bad rows (NaN, +inf
    or all -inf) are -1. Any strides (the vocabulary dim is copied only when it
    is not unit-stride). check_lengths validates 0 <= valid_len <= M on the
    host (a stream sync on CUDA; skip it on a hot path when known valid).
    banned: None or (start, end): ids [start, end) are never drafted, as if
    their logits were -inf (the pair checker's banned ids, SEMANTICS.md).

    Per-row settings: temperature, top_p (float32), top_k (int32/int64) and
    compat (int32/int64: 1 = "official", 0 = default) may each be a [B] tensor
    on the logits' device; row b then samples exactly as a call on its own with
    the scalars temperature[b], top_k[b], ... (the float32 values, as Python
    floats). Their values are checked on the host under check_lengths.
    """
    _check_logits("logits", logits)
    B, M, _ = logits.shape
    _check_row_vectors(B, logits.device, pos_start, valid_len, seeds, steps)
    sc, rows = _split_rows(B, logits.device, dict(temperature=temperature, top_k=top_k, top_p=top_p, compat=compat))
    temperature, top_k, top_p = _check_sampler(sc["temperature"], sc["top_k"], sc["top_p"])
    compat = sc["compat"] if "compat" in rows else _check_compat(compat)
    ban_start, ban_end = _check_banned(banned)
    if _check_lengths_now(check_lengths):
        _check_valid_len_values(valid_len, M)
        if rows:
            _check_row_values(rows)
    return torch.ops.apd.sample_draft(logits, pos_start, valid_len, seeds, steps, temperature, top_k, top_p, compat,
                                      ban_start, ban_end, rows.get("temperature"), rows.get("top_k"),
                                      rows.get("top_p"), rows.get("compat"))


def mixture_accept(
    dllm_logits: torch.Tensor,  # [B, M, V_D]
    ar_logits: torch.Tensor,  # [B, M, V_A], dllm_logits' dtype
    draft: torch.Tensor,  # [B, M] int64
    pos_start: torch.Tensor,  # [B] int32/int64
    valid_len: torch.Tensor,  # [B] int32/int64
    seeds: torch.Tensor,  # [B] int64
    steps: torch.Tensor,  # [B] int32/int64
    *,
    R: float | torch.Tensor,
    temperature: float | torch.Tensor = 0.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    eos_ids=None,
    acceptance: str | None | torch.Tensor = None,
    compat: str | None | torch.Tensor = None,
    banned: tuple[int, int] | None = None,
    check_lengths: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ids and accepted prefix lengths (DESIGN.md §4, Op 2).

    acceptance="coupled" (default): target = sample(m) with
    m = R logsoftmax(dllm) + (1 - R) logsoftmax(ar) over v < V = min(V_D, V_A),
    the same temperature / top_k / top_p and the SAME noise (seeds, steps,
    positions) as sample_draft. acceptance="argmax" (the default under
    compat="official"): target = argmax_{v<V} R dllm + (1 - R) ar, raw logits
    (under compat="official" each product and the sum rounded to the logits'
    dtype, as the released torch code computes it).
    n_accept[b] = a_0 = 1 followed by the rows where draft == target, capped at
    valid_len[b] and cut just after the first accepted id in eos_ids (None,
    an int, a list of ints or an int tensor [E]); 0 when valid_len[b] == 0.

    banned: None or (start, end): ids [start, end) read as -inf in both rows
    (their lse included) and in the target, so they are never a target and
    never accepted (the pair checker's banned ids, SEMANTICS.md).

    Returns (target [B, M] int64, -1 on invalid and bad rows; n_accept [B] int64).

    Per-row settings, as in sample_draft: temperature, top_p (float32), R
    (float32 or float64: float64 gives compat="official" the exact 1 - R of a
    Python float R), top_k, acceptance (1 = "argmax", 0 = "coupled") and compat (1 = "official")
    may each be a [B] tensor on the logits' device, and eos_ids a [B, E] int
    tensor (row b's stop ids, padded with -1: negative ids never match). Row b
    then gives exactly what a call on its own with row b's scalars gives. With
    a compat tensor and acceptance None, the official rows take "argmax" and
    the others "coupled".
    """
    _check_logits("dllm_logits", dllm_logits)
    device = dllm_logits.device
    _check_logits("ar_logits", ar_logits, dtypes=(dllm_logits.dtype,), device=device)
    B, M, _ = dllm_logits.shape
    if tuple(ar_logits.shape[:2]) != (B, M):
        fail("ar_logits", f"shape [{B}, {M}, V_A] (dllm_logits' B and M)", list(ar_logits.shape))
    check_tensor("draft", draft, ndim=2, dtypes=(torch.int64,), device=device, shape=(B, M))
    _check_row_vectors(B, device, pos_start, valid_len, seeds, steps)
    sc, rows = _split_rows(B, device, dict(R=R, temperature=temperature, top_k=top_k, top_p=top_p,
                                           compat=compat, acceptance=acceptance))
    R = _check_number("R", sc["R"])
    check_range("R", R, 0.0, 1.0)
    temperature, top_k, top_p = _check_sampler(sc["temperature"], sc["top_k"], sc["top_p"])
    compat = sc["compat"] if "compat" in rows else _check_compat(compat)
    if "acceptance" in rows:  # the scalar stands in only for the op's own check
        acceptance = "argmax" if compat == "official" else "coupled"
    else:
        check_choice("acceptance", acceptance, (None, "coupled", "argmax"))
        if acceptance is None and "compat" in rows:  # per row: official rows argmax, the others coupled
            rows["acceptance"] = rows["compat"]
            acceptance = "coupled"
        elif acceptance is None:
            acceptance = "argmax" if compat == "official" else "coupled"
        if compat == "official" and acceptance == "coupled":
            fail("acceptance", '"argmax" or None with compat="official"', "'coupled'")
    eos = _eos_tensor(eos_ids, device, B)
    ban_start, ban_end = _check_banned(banned)
    if _check_lengths_now(check_lengths):
        _check_valid_len_values(valid_len, M)
        if rows:
            _check_row_values(rows, True, compat, acceptance)
    return torch.ops.apd.mixture_accept(
        dllm_logits, ar_logits, draft, pos_start, valid_len, seeds, steps, R, temperature, top_k, top_p, eos,
        acceptance, compat, ban_start, ban_end, rows.get("R"), rows.get("temperature"), rows.get("top_k"),
        rows.get("top_p"), rows.get("acceptance"), rows.get("compat"),
    )


def accept_prefix(
    draft: torch.Tensor,  # [B, M] int64
    target: torch.Tensor,  # [B, M] int64
    valid_len: torch.Tensor,  # [B] int32/int64
    eos_ids=None,
    *,
    check_lengths: bool = True,
) -> torch.Tensor:
    """The accept scan of mixture_accept alone (DESIGN.md §4, Op 3): n_accept [B]
    int64 = 1 + the number of leading rows i >= 1 with draft == target (ids < 0
    never match), capped at valid_len[b], cut just after the first accepted EOS."""
    check_tensor("draft", draft, ndim=2, dtypes=(torch.int64,))
    device = draft.device
    if device.type not in ("cpu", "cuda"):
        fail("draft", "a tensor on cpu or cuda", f"one on {device}")
    _check_build(device)
    B, M = draft.shape
    check_tensor("target", target, ndim=2, dtypes=(torch.int64,), device=device, shape=(B, M))
    check_batch_vector("valid_len", valid_len, B, device)
    eos = _eos_tensor(eos_ids, device, B)
    if _check_lengths_now(check_lengths):
        _check_valid_len_values(valid_len, M)
    return torch.ops.apd.accept_prefix(draft, target, valid_len, eos)


@torch.library.register_fake("apd::sample_draft")
def _sample_draft_fake(logits, pos_start, valid_len, seeds, steps, temperature, top_k, top_p, compat,
                       ban_start=0, ban_end=0, row_temperature=None, row_top_k=None, row_top_p=None,
                       row_compat=None):
    torch._check(logits.dim() == 3, lambda: "sample_draft: logits must be [B, M, V]")
    return logits.new_empty(logits.shape[:2], dtype=torch.int64)


@torch.library.register_fake("apd::mixture_accept")
def _mixture_accept_fake(dllm_logits, ar_logits, draft, pos_start, valid_len, seeds, steps, R, temperature,
                         top_k, top_p, eos_ids, acceptance, compat, ban_start=0, ban_end=0, row_R=None,
                         row_temperature=None, row_top_k=None, row_top_p=None, row_acceptance=None,
                         row_compat=None):
    torch._check(dllm_logits.dim() == 3 and ar_logits.dim() == 3, lambda: "mixture_accept: logits must be 3-D")
    B, M = dllm_logits.shape[:2]
    return dllm_logits.new_empty((B, M), dtype=torch.int64), dllm_logits.new_empty((B,), dtype=torch.int64)


@torch.library.register_fake("apd::accept_prefix")
def _accept_prefix_fake(draft, target, valid_len, eos_ids):
    torch._check(draft.dim() == 2, lambda: "accept_prefix: draft must be [B, M]")
    return draft.new_empty(draft.shape[:1])

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
    _check_build(device)
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
