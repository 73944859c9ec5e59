"""compat="official" against the authors' released sampling code (issue 12).

The released functions (github.com/danielmisrael/apd, dream/generation_utils.py:
top_p_logits, top_k_logits, add_gumbel_noise, sample_with_gumbel,
apd_accept_criterion and the lines of apd_sample that call them) are
transcribed below as plain torch code, written for these tests from reading
that file: the same torch ops on tensors of the logits' own dtype, so torch
applies the same bf16/fp16 rounding as it did for the authors. apd_ext.ops
(the CPU kernels) and apd_ext.reference must then give

- the released target ids and n_accept exactly (deterministic: no noise);
- draft draws with the released distribution: chi-square and total variation
  over 10^4 draws per case against the exact distribution of the released
  sampler (softmax of the filtered l'/tau, l' = l/tau in the logits' dtype),
  itself first checked against the transcription's own Gumbel draws;
- the three examples of the issue.

The released sort is torch.sort (not stable): when a top-p cut falls inside a
group of equal values, WHICH of the equal ids it keeps is torch's choice, and
apd-ext keeps the lowest-index ones (SEMANTICS.md). Draws are therefore
compared with the ids of such a partially kept group pooled into one class.
"""
import math

import pytest
import torch

from apd_ext import ops
from apd_ext import reference as ref

V_D, V_A = 152064, 151936
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
P_MIN = 1e-5  # chi-square p-value floor (fixed seeds: deterministic outcome)


# ---------------------------------------------------------------------------
# The released code, transcribed (torch ops in the logits' dtype)
# ---------------------------------------------------------------------------


def released_top_p(logits, top_p):
    """Sort descending, cumulate the softmax, drop entries after the first whose
    cumulative probability exceeds top_p (that one stays), fill with finfo.min."""
    vals, idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(torch.softmax(vals, dim=-1), dim=-1)
    over = cum > top_p
    drop_sorted = torch.cat([torch.zeros_like(over[..., :1]), over[..., :-1]], dim=-1)
    drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def released_top_k(logits, top_k):
    """Drop every entry strictly below the k-th largest value (ties all stay)."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def released_filter(logits, temperature, top_p, top_k):
    """The lines of sample_with_gumbel before the noise."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = released_top_p(logits, top_p)
    if top_k is not None:
        logits = released_top_k(logits, top_k)
    return logits


def released_sample(logits, temperature, top_p, top_k, generator):
    """sample_with_gumbel with fresh noise: argmax of exp(l') / (-log u)^tau in fp64."""
    filt = released_filter(logits, temperature, top_p, top_k)
    if temperature == 0:
        return torch.argmax(filt, dim=-1)
    l64 = filt.to(torch.float64)
    u = torch.rand(l64.shape, dtype=torch.float64, generator=generator)
    return torch.argmax(l64.exp() / (-torch.log(u)) ** temperature, dim=-1)


def released_target(d, a, R):
    """apd_accept_criterion's target: R * d + (1 - R) * a on the logits, argmax."""
    return torch.argmax(R * d + (1 - R) * a, dim=-1)


def released_n_accept(draft, target):
    acc = draft == target
    acc[:, 0] = True
    return torch.cumprod(acc.to(torch.int64), dim=-1).sum(-1)


def released_distribution(row, temperature, top_p, top_k):
    """Exact draw distribution of released_sample on one row [V], and the class
    of each id [V] (ids of a value group the top-p cut keeps only partly share
    the class of the group's lowest id). argmax exp(l')/E^tau is argmax l'/tau + G
    with G Gumbel, so the distribution is softmax(l'/tau) over the kept ids."""
    filt = released_filter(row, temperature, top_p, top_k)
    kept = filt != torch.finfo(row.dtype).min
    z = (row / temperature).float()  # l' (the dtype-rounded quotient), as fp32
    w = torch.where(kept, z.double() / temperature, -math.inf)
    p = torch.softmax(w, 0)
    ids = torch.arange(row.numel())
    _, group = torch.unique(z, return_inverse=True)  # [V] value group of each id
    size = torch.bincount(group)
    n_kept = torch.bincount(group, weights=kept.double()).long()
    partial = (n_kept > 0) & (n_kept < size)
    lowest = torch.full_like(size, row.numel()).scatter_reduce(0, group, ids, "amin")
    return p, torch.where(partial[group], lowest[group], ids)


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def chi2_pvalue(x, dof):
    """Upper tail of chi2(dof) at x, Wilson-Hilferty normal approximation."""
    if dof <= 0:
        return 1.0
    zz = ((x / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(zz / math.sqrt(2))


def check_counts(counts, p, label):
    """Pearson chi-square (bins with expected count < 5 pooled) and TV of the
    observed class counts [C] against class probabilities p [C]."""
    n = counts.sum()
    expected = p * n
    assert float(counts[p == 0].sum()) == 0, f"{label}: drew a class the released code never draws"
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    pv = chi2_pvalue(chi2, int(keep.sum()) - 1)
    tv = 0.5 * float((counts / n - p).abs().sum())
    # Expected TV of a correct sampler is about sum sqrt(p (1 - p) / n) / sqrt(2 pi).
    tv_noise = float((p * (1 - p) / n).sqrt().sum()) / math.sqrt(2 * math.pi)
    assert pv > P_MIN and tv < 3 * tv_noise + 0.005, f"{label}: chi2 {chi2:.1f} p={pv:.2e} tv {tv:.4f}"
    return tv


def kernel_draws(row, n, temperature, top_p, top_k, seed):
    """n draws of ops.sample_draft(compat="official") on one row [V] (stride-0 batch)."""
    V = row.numel()
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randint(-(2**62), 2**62, (n,), generator=gen)
    zeros = torch.zeros(n, dtype=torch.int64)
    draft = ops.sample_draft(row.reshape(1, 1, V).expand(n, 1, V), zeros, torch.ones(n, dtype=torch.int64),
                             seeds, zeros, temperature=temperature, top_k=top_k or 0, top_p=top_p,
                             compat="official")
    return draft[:, 0]


def tied_row(V, dtype, temperature, gen):
    """Logits near 10 (so l / tau rounds coarsely in bf16/fp16) spread so that
    l / tau^2 spans a few units; values on a grid to force exact ties."""
    x = 10.0 + torch.randn(V, generator=gen) * 2 * temperature**2
    x = torch.round(x * 64) / 64
    return x.to(dtype)


def tie_k(row, temperature):
    """A top_k whose k-th largest value of l / tau is tied with the next one."""
    z = (row / temperature).float()
    vals = torch.sort(z, descending=True).values
    for k in range(2, min(40, vals.numel())):
        if vals[k - 1] == vals[k]:
            return k
    return 3


# ---------------------------------------------------------------------------
# The examples
# ---------------------------------------------------------------------------


def _one(n):
    return torch.full((n,), 1, dtype=torch.int64)


def _zero(n):
    return torch.zeros(n, dtype=torch.int64)


def test_example_bf16_target():
    d = torch.tensor([[[5.0, 0.0], [1.0, 1.0078125]]], dtype=torch.bfloat16)  # a row in front, then the example
    a = torch.tensor([[[5.0, 0.0], [1.0, 1.0]]], dtype=torch.bfloat16)
    draft = torch.tensor([[0, 0]])
    assert released_target(d, a, 0.5).tolist() == [[0, 0]]
    for impl in (ops, ref):
        target, n = impl.mixture_accept(d, a, draft, _zero(1), torch.tensor([2]), _zero(1), _zero(1), R=0.5,
                                        compat="official")
        assert target.tolist() == [[0, 0]] and n.tolist() == [2], impl.__name__
    # The default mode keeps fp32 semantics: 0.5 * 1.0078125 + 0.5 > 1.
    target, n = ops.mixture_accept(d, a, draft, _zero(1), torch.tensor([2]), _zero(1), _zero(1), R=0.5,
                                   acceptance="argmax")
    assert target.tolist() == [[0, 1]] and n.tolist() == [1]


def test_example_bf16_draft_distribution():
    row = torch.tensor([12.0, 12.0625], dtype=torch.bfloat16)
    p, _ = released_distribution(row, 0.2, None, None)
    assert abs(float(p[1]) - 0.777) < 1e-3  # the released code's answer
    n = 20000
    draws = kernel_draws(row, n, 0.2, 1.0, None, seed=1)
    p_hat = float((draws == 1).double().mean())
    sigma = math.sqrt(0.777 * 0.223 / n)
    assert abs(p_hat - float(p[1])) < 5 * sigma, p_hat  # apd-ext before the fix: 0.827 (17 sigma away)
    ref_draws = ref.sample_draft(row.reshape(1, 1, 2).expand(64, 1, 2), _zero(64), _one(64), torch.arange(64),
                                 _zero(64), temperature=0.2, compat="official")
    assert torch.equal(ref_draws[:, 0], kernel_draws_seeds(row, torch.arange(64), 0.2))


def kernel_draws_seeds(row, seeds, temperature):
    n, V = seeds.numel(), row.numel()
    return ops.sample_draft(row.reshape(1, 1, V).expand(n, 1, V), _zero(n), _one(n), seeds, _zero(n),
                            temperature=temperature, compat="official")[:, 0]


def test_example_top_k_ties():
    row = torch.tensor([1.0, 1.0, 0.0])
    p, _ = released_distribution(row, 1.0, None, 1)
    assert p.tolist() == pytest.approx([0.5, 0.5, 0.0])
    draws = kernel_draws(row, 10000, 1.0, 1.0, 1, seed=2)
    counts = torch.bincount(draws, minlength=3).double()
    check_counts(counts, p, "top_k ties")
    assert counts[0] > 4500 and counts[1] > 4500  # before the fix: id 0 always


# ---------------------------------------------------------------------------
# Deterministic parts, full vocabularies (V_D = 152064 against V_A = 151936)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 8, 100])
def test_target_and_n_accept_exact(dtype, M):
    gen = torch.Generator().manual_seed(M)
    B = 1 if M == 100 else 3
    # Logits on a 1/16 grid: the products and sums round in bf16/fp16, and
    # equal maxima (lowest index wins) are common.
    d = (torch.round(torch.randn(B, M, V_D, generator=gen) * 48) / 16).to(dtype)
    a = (torch.round(torch.randn(B, M, V_A, generator=gen) * 48) / 16).to(dtype)
    impls = (ops,) if M == 100 else (ops, ref)  # the reference is slow on 100 full rows
    for R in (0.1, 0.5, 0.7, 0.9):
        want = released_target(d[..., :V_A], a, R)  # apd_sample slices the dLLM row to the verifier's vocab
        draft = want.clone()
        cut = torch.randint(0, M, (B,), generator=gen)
        draft[torch.arange(B), cut] = (draft[torch.arange(B), cut] + 1) % V_A  # cut the accepted prefix
        valid = torch.full((B,), M)
        seeds = torch.randint(0, 2**62, (B,), generator=gen)
        for impl in impls:
            target, n = impl.mixture_accept(d, a, draft, _zero(B), valid, seeds, _zero(B), R=R, temperature=0.2,
                                            top_p=0.95, compat="official")
            assert torch.equal(target, want), (impl.__name__, R)
            assert torch.equal(n, released_n_accept(draft, want)), (impl.__name__, R)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_greedy_draft_exact(dtype):
    """tau = 0: the released draft is the argmax of the (filtered) logits."""
    gen = torch.Generator().manual_seed(5)
    l = (torch.round(torch.randn(2, 8, V_D, generator=gen) * 32) / 16).to(dtype)
    want = released_sample(l, 0.0, 0.9, None, gen)
    got = ops.sample_draft(l, _zero(2), torch.full((2,), 8), _zero(2), _zero(2), temperature=0.0, top_p=0.9,
                           compat="official")
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------
# Draws by distribution
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_transcription_distribution(dtype):
    """released_distribution is the distribution of released_sample's own draws."""
    gen = torch.Generator().manual_seed(11)
    row = tied_row(61, dtype, 0.5, gen)
    k = tie_k(row, 0.5)
    p, cls = released_distribution(row, 0.5, 0.9, k)
    draws = released_sample(row.expand(20000, 61), 0.5, 0.9, k, gen)
    counts = torch.zeros(61, dtype=torch.float64).index_add_(0, cls[draws], torch.ones(20000, dtype=torch.float64))
    check_counts(counts, torch.zeros(61, dtype=torch.float64).index_add_(0, cls, p), "transcription")


CASES = [(tau, top_p, k) for tau in (0.2, 0.5, 0.7, 1.0) for top_p, k in ((0.9, None), (1.0, "tie"), (0.8, "tie"))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_draft_distribution_small_vocab(dtype):
    """10^4 draws per case, V = 257, every (tau, top_p, top_k-with-ties) case."""
    gen = torch.Generator().manual_seed(3)
    V, n = 257, 10000
    for i, (tau, top_p, k) in enumerate(CASES):
        row = tied_row(V, dtype, tau, gen)
        top_k = tie_k(row, tau) if k == "tie" else None
        p, cls = released_distribution(row, tau, top_p, top_k)
        draws = kernel_draws(row, n, tau, top_p, top_k, seed=100 + i)
        counts = torch.zeros(V, dtype=torch.float64).index_add_(0, cls[draws], torch.ones(n, dtype=torch.float64))
        check_counts(counts, torch.zeros(V, dtype=torch.float64).index_add_(0, cls, p),
                     f"{dtype} tau={tau} top_p={top_p} top_k={top_k}")


@pytest.mark.parametrize("dtype,tau,top_p,k", [(torch.bfloat16, 0.2, 0.95, "tie")], ids=["bf16-0.2-topk"])
def test_draft_distribution_full_vocab(dtype, tau, top_p, k):
    """10^4 draws on a V_D = 152064 row whose mass sits on a few hundred ids
    (the tail 40 below the head, as in a peaked LM row). One case: 10^4 full
    rows cost ~20 s of CI (fp16's software rounding ~50 s); the (dtype, tau,
    top_p, top_k) grid runs on V = 257 above."""
    gen = torch.Generator().manual_seed(7)
    row = (torch.randn(V_D, generator=gen) * 2 * tau**2 + 3.0)
    row[:300] += 40.0  # the head: l / tau^2 spans a few units there
    row = (torch.round(row * 64) / 64).to(dtype)
    top_k = tie_k(row, tau) if k == "tie" else None
    p, cls = released_distribution(row, tau, top_p, top_k)
    n = 10000
    draws = kernel_draws(row, n, tau, top_p, top_k, seed=9)
    counts = torch.zeros(V_D, dtype=torch.float64).index_add_(0, cls[draws], torch.ones(n, dtype=torch.float64))
    check_counts(counts, torch.zeros(V_D, dtype=torch.float64).index_add_(0, cls, p), f"{dtype} full vocab")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_matches_kernels(dtype):
    """apd_ext.reference's official path gives the CPU kernels' ids (same noise),
    except on rows it flags as fragile (a top-p cut a few fp32 ulps from the
    rounding boundary of the released dtype)."""
    gen = torch.Generator().manual_seed(13)
    B, M, V = 3, 8, 997
    for tau, top_p, top_k in ((0.2, 0.95, 0), (0.7, 0.9, 5), (1.0, 1.0, 4), (0.5, 0.8, 0)):
        l = (10.0 + torch.round(torch.randn(B, M, V, generator=gen) * 64 * tau**2) / 32).to(dtype)
        seeds = torch.randint(0, 2**62, (B,), generator=gen)
        args = (l, torch.randint(0, 100, (B,), generator=gen), torch.full((B,), M), seeds, torch.arange(B))
        kw = dict(temperature=tau, top_k=top_k, top_p=top_p, compat="official")
        got = ops.sample_draft(*args, **kw)
        want, fragile = ref.sample_draft_impl(*args, **kw)
        assert bool(((got == want) | fragile).all()), (dtype, tau, top_p, top_k)
        assert float(fragile.double().mean()) < 0.1


# ---------------------------------------------------------------------------
# The noise's log
# ---------------------------------------------------------------------------


def _ulps(got, x):
    """Max distance of fp32 `got` from log(x) (fp64) in fp32 ulps at the result."""
    want = torch.log(x.double())
    _, e = torch.frexp(want)
    return ((got.double() - want).abs() / torch.ldexp(torch.ones_like(want), e - 24)).max().item()


def test_reference_noise_is_the_kernels():
    """apd_ext.reference's noise (philox.h's log_fp32 transcribed op for op) has
    the C++ bits: the FNV-1a hash of the Gumbel values of the words
    (127 i) << 9, i < 65536, equals the one ctest test_log pins for the C++
    function; and that log is within 1 ulp of the fp64 log on those u and
    every -log(u) (ctest test_log checks all 2^23 u)."""
    x = (torch.arange(65536, dtype=torch.int64) * 127) << 9
    u = ((x >> 9).to(torch.float32) + 0.5) * 2.0**-23
    inner = -ref.log_fp32(u)
    g = -ref.log_fp32(inner)
    assert _ulps(-inner, u) <= 1.0 and _ulps(-g, inner) <= 1.0
    h = 1469598103934665603
    for b in g.view(torch.int32).numpy().astype("<u4").tobytes():
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    assert h == 0x037B1468C28B92A7


@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=pytest.mark.cuda),
                                     pytest.param("emu", marks=pytest.mark.emu)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_official_matches_cpu(dtype, backend):
    """CUDA and CPU kernels: the same official draws and targets. Rows of equal
    logits make the draw the argmax of the noise alone, so a noise bit that
    differed between host and device would show as a different id. backend
    "cuda" runs the kernels on a device; "emu" runs the same CUDA sources on
    the CPU execution harness (tests/emu), fewer rows."""
    if backend == "emu":
        import emu_backend

        emu_backend.load()
        kernels, move, B, M = emu_backend.ops(), (lambda t: t), 2, 3
    else:
        kernels, move, B, M = ops, (lambda t: t.cuda()), 4, 16
    gen = torch.Generator().manual_seed(17)
    for V, scale in ((V_D, 0.0), (V_D, 0.3), (1001, 0.05)):
        l = (10.0 + torch.round(torch.randn(B, M, V, generator=gen) * scale * 64) / 64).to(dtype)
        args = (torch.randint(0, 100, (B,), generator=gen), torch.full((B,), M),
                torch.randint(0, 2**62, (B,), generator=gen), torch.arange(B))
        for tau, top_p, top_k in ((1.0, 1.0, 0), (0.2, 0.95, 0), (0.7, 0.9, 7)):
            kw = dict(temperature=tau, top_k=top_k, top_p=top_p, compat="official")
            cpu = ops.sample_draft(l, *args, **kw)
            dev = kernels.sample_draft(move(l), *(move(t) for t in args), **kw).cpu()
            assert torch.equal(cpu, dev), (dtype, V, scale, tau)
    d = (torch.round(torch.randn(B, M, V_D, generator=gen) * 48) / 16).to(dtype)
    a = (torch.round(torch.randn(B, M, V_A, generator=gen) * 48) / 16).to(dtype)
    draft = released_target(d[..., :V_A], a, 0.7)
    cpu = ops.mixture_accept(d, a, draft, *args, R=0.7, compat="official")
    dev = kernels.mixture_accept(move(d), move(a), move(draft), *(move(t) for t in args), R=0.7,
                                 compat="official")
    assert all(torch.equal(x, y.cpu()) for x, y in zip(cpu, dev))
