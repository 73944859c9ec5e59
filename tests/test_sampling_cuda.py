"""CUDA sampling kernels against the CPU kernels, token for token.

Every case runs the op on the GPU and on the CPU (same inputs, copied) and
requires identical ids, except on rows that the pure-PyTorch reference flags
as fragile (fp32 near-ties of the final argmax or a top-p cut within 1e-5 of
the boundary; SEMANTICS.md allows implementations to differ only there).
n_accept is checked exactly against the reference scan of the CUDA targets.
Every test runs twice: on the GPU (backend "cuda", skipped without a device,
tests/conftest.py) and on the CPU emulator of the same CUDA kernels (backend
"emu", tests/emu: the launchers compiled as host code, each call run under
three thread schedules that must agree). OPS is the op set of the backend;
CPU-kernel calls always go through apd_ext.ops.
"""
import sys

import emu_backend
import pytest
import sampling_rows
import torch
from skips import not_applicable

from apd_ext import ops, reference

DEV = "cuda"
OPS = ops


# Tests that run on every device profile of the emulator in CI (a few shapes
# each: emu_quick(..., profile_keep=...)); APD_EMU_FULL=1 runs all of them on
# all profiles. The sampler's grid (one 512-thread CTA per row, static shared
# memory only) does not depend on the device: these check that it launches
# and agrees under each profile's limits.
PROFILE_TESTS = {"test_sample_draft_matches_cpu", "test_mixture_accept_matches_cpu",
                 "test_per_row_settings_match_rows_alone"}


@pytest.fixture(autouse=True, params=emu_backend.backend_params())
def backend(request, monkeypatch):
    """"cuda", or "emu" on the default (H100) profile or on emu-<profile> (the
    test sees "emu"; the profile is the harness's active device)."""
    if request.param == "cuda":
        yield "cuda"
        return
    with emu_backend.on_profile(request.param, request.function.__name__, PROFILE_TESTS):
        monkeypatch.setattr(sys.modules[__name__], "DEV", "cpu")
        monkeypatch.setattr(sys.modules[__name__], "OPS", emu_backend.ops())
        yield "emu"


# The emulator runs every CTA as 512 fibers under three schedules, ~1000x
# slower than the device. On "emu" the 100-row shapes keep 9 rows, and the
# quick subset (emu_backend.quick; APD_EMU_FULL=1 lifts it) keeps every
# sampler mode in every dtype on the small shapes and bf16 for the big ones.
def emu_rows(backend, M):
    return min(M, 9) if backend == "emu" else M


def emu_quick(backend, keep, profile_keep=False):
    if backend == "emu":
        emu_backend.quick(backend, keep)
        emu_backend.profile_quick(profile_keep)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (temperature, top_k, top_p, compat)
SAMPLERS = [
    (0.0, 0, 1.0, None),
    (0.7, 0, 1.0, None),
    (0.7, 50, 1.0, None),
    (0.7, 0, 0.9, None),
    (0.2, 20, 0.95, None),
    (1.3, 3, 0.5, None),
    (0.7, 40, 0.9, "official"),
    (0.2, 0, 0.95, "official"),
]


def make_logits(B, M, V, dtype, *, seed, layout="contiguous", ties=False, scale=3.0):
    """[B, M, V] logits on the GPU with an exact tie at the max in every other
    row; layout picks the memory layout: contiguous, padded (row stride V + 3:
    unaligned rows), transposed (stride_b < stride_m) or vstride (stride 2
    along V)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, V, generator=g) * scale
    if ties:  # coarse values: many exact ties, also at the top-k / top-p cut
        x = torch.round(x * 2.0) / 2.0
    if V > 3:
        x[:, ::2, V // 2] = x[:, ::2].amax(-1)
    x = x.to(dtype)
    if layout == "padded":
        buf = torch.full((B, M, V + 3), -7.0, dtype=dtype)
        buf[..., 1 : V + 1] = x
        return buf.to(DEV)[..., 1 : V + 1]
    if layout == "transposed":
        return x.transpose(0, 1).contiguous().to(DEV).transpose(0, 1)
    if layout == "vstride":
        buf = torch.zeros(B, M, 2 * V, dtype=dtype)
        buf[..., ::2] = x
        return buf.to(DEV)[..., ::2]
    return x.to(DEV)


def seq_inputs(B, M, seed, *, full=False, int32=False):
    g = torch.Generator().manual_seed(seed + 1)
    pos_start = torch.randint(0, 4000, (B,), generator=g)
    valid_len = torch.full((B,), M) if full else torch.randint(0, M + 1, (B,), generator=g)
    valid_len[0] = M  # at least one full sequence
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=g, dtype=torch.int64)
    steps = torch.randint(0, 2**40, (B,), generator=g, dtype=torch.int64)
    if int32:
        pos_start, valid_len, steps = (t.to(torch.int32) for t in (pos_start, valid_len, steps % 2**31))
    return [t.to(DEV) for t in (pos_start, valid_len, seeds, steps)]


def cpu(ts):
    return [t.cpu() for t in ts]


MAX_FRAGILE = 0.1  # as tests/test_sampling.py: no case may pass vacuously


def assert_ids_match(got, want, fragile, what, *, exact=False):
    """got (CUDA) == want (CPU) wherever the reference does not flag the row.
    exact=True where both kernels compute bit-identical values (the raw logits
    at temperature 0, the argmax mixture): there even exact ties must go to
    the same (lowest) index, so no row is excused."""
    got = got.cpu()
    assert got.shape == want.shape and got.dtype == torch.int64
    if exact:
        fragile = torch.zeros_like(fragile)
    bad = (got != want) & ~fragile
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} rows differ from the CPU kernel outside near-ties, "
        f"first at {bad.nonzero()[0].tolist()}: cuda {got[bad][:5].tolist()} vs cpu {want[bad][:5].tolist()}"
    )
    if fragile.numel() >= 50:
        assert fragile.float().mean() <= MAX_FRAGILE, f"{what}: too many fragile rows"


def check_sample_draft(logits, seq, sampler):
    tau, top_k, top_p, compat = sampler
    kw = dict(temperature=tau, top_k=top_k, top_p=top_p, compat=compat)
    got = OPS.sample_draft(logits, *seq, **kw)
    want = ops.sample_draft(logits.cpu(), *cpu(seq), **kw)
    _, fragile = reference.sample_draft_impl(logits.cpu(), *cpu(seq), **kw)
    assert_ids_match(got, want, fragile, f"sample_draft {logits.dtype} {tuple(logits.shape)} {sampler}",
                     exact=tau == 0.0)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("B,M,V", [(1, 1, 1), (3, 3, 7), (3, 100, 509), (2, 3, 152064)])
def test_sample_draft_matches_cpu(B, M, V, dtype, sampler, backend):
    emu_quick(backend, V < 100 or (dtype == torch.bfloat16 and (V < 100000 or sampler[2] < 1.0)),
              profile_keep=V == 7 and dtype == torch.bfloat16 and sampler in (SAMPLERS[4], SAMPLERS[6]))
    seed = B * 1000 + M * 10 + V
    M = emu_rows(backend, M)
    check_sample_draft(make_logits(B, M, V, dtype, seed=seed), seq_inputs(B, M, seed), sampler)


@pytest.mark.parametrize("layout", ["padded", "transposed", "vstride"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_draft_strided(layout, dtype, backend):
    emu_quick(backend, dtype == torch.bfloat16)
    logits = make_logits(3, 5, 1031, dtype, seed=7, layout=layout)
    assert not logits.is_contiguous()
    seq = seq_inputs(3, 5, 7, int32=True)
    for sampler in SAMPLERS:
        check_sample_draft(logits, seq, sampler)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [509, 152064])
def test_sample_draft_ties(dtype, V, backend):
    """Coarse logits put many equal values at the top-k / top-p threshold, so
    the lowest-index tie rule decides which of them are kept."""
    emu_quick(backend, V < 100000 and dtype == torch.bfloat16)
    logits = make_logits(2, 6, V, dtype, seed=11, ties=True, scale=2.0)
    seq = seq_inputs(2, 6, 11, full=True)
    for sampler in SAMPLERS + [(0.5, 7, 1.0, None), (0.5, 1, 1.0, None), (0.5, 0, 0.3, None)]:
        check_sample_draft(logits, seq, sampler)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_draft_candidate_staging(dtype, backend):
    """Rows around the sampler's shared-memory staging of candidates
    (kStageCap = 1536 in apd/cuda/sampling.cuh): a few large values (staged
    right after the max pass), a mildly peaked row (too many candidates for
    that: staged by a radix pass, or not at all), a flat row and blocks of 1535
    to 2000 equal values at the top (at, just over and far over the capacity:
    the kernel must fall back to global memory and keep the tie rule), and a
    row whose bulk sits 17 below the max at tau = 1: outside the staged top
    of the row (z >= zmax - 16) but holding ~2e-4 of the mass, so that a
    top-p of 0.9999 cuts inside it and the staging must give up."""
    emu_quick(backend, dtype == torch.bfloat16)
    V = 4099
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 8, V, generator=g)
    x[0, 0] = torch.randn(V, generator=g) - 20.0
    x[0, 0, ::613] = 3.0 + torch.arange(7) * 0.25  # few candidates
    x[0, 1] = torch.randn(V, generator=g) * 0.5  # mildly peaked
    x[0, 2] = 0.0  # flat
    for r, n in ((3, 1535), (4, 1536), (5, 1537), (6, 2000)):
        x[0, r] = torch.randn(V, generator=g) - 30.0
        x[0, r, torch.randperm(V, generator=g)[:n]] = 1.0  # n exact ties at the top, scattered
    x[0, 7] = -17.0 + 0.01 * torch.randn(V, generator=g)
    x[0, 7, 2049] = 0.0
    logits = x.to(dtype).to(DEV)
    seq = seq_inputs(1, 8, 5, full=True)
    # official without top-p: top-k on z rounded to the dtype, which merges
    # neighbouring x into ties across the first-level bins of x.
    for sampler in SAMPLERS + [(1.0, 1500, 1.0, None), (1.0, 1600, 0.99, None), (1.0, 0, 0.999, None),
                               (1.0, 0, 0.9999, None), (1.0, 0, 0.99999, None),
                               (1.0, 1536, 0.9, "official"), (0.7, 40, 1.0, "official"),
                               (3.0, 1000, 1.0, "official")]:
        check_sample_draft(logits, seq, sampler)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_draft_one_pass_running_max(dtype, backend):
    """The default top-p alone stages in the pass that finds the max, from a
    running max: the block max of the first kUnroll-deep tiles (16384 bf16 /
    fp16 entries, 8192 fp32), then each thread's own. Rows whose max comes
    later: 300 entries staged early and dropped once the max is known
    (row 0), 2000 early ones that overflow the stage, so the max and staging
    passes run after all (row 1), the max at the last index (row 2), and a
    plain N(0, 3) row."""
    emu_quick(backend, dtype == torch.bfloat16)
    V = 40000
    g = torch.Generator().manual_seed(41)
    x = torch.randn(1, 4, V, generator=g) * 0.5 - 10.0
    x[0, 0, torch.randperm(8000, generator=g)[:300]] = 3.0  # staged at the first tiles' max 5, not at 8
    x[0, 0, 100] = 5.0
    x[0, 0, 20000 + torch.arange(5) * 7] = 8.0 - torch.arange(5) * 0.1
    x[0, 1, torch.randperm(8000, generator=g)[:2000]] = 3.0
    x[0, 1, 100] = 5.0
    x[0, 1, 30001] = 8.0
    x[0, 2, V - 1] = 2.0
    x[0, 3] = torch.randn(V, generator=g) * 3.0
    logits = x.to(dtype).to(DEV)
    seq = seq_inputs(1, 4, 41, full=True)
    for sampler in [(0.2, 0, 0.95, None), (0.2, 0, 0.5, None), (0.7, 0, 0.9, None), (1.0, 0, 0.9999, None)]:
        got = check_sample_draft(logits, seq, sampler)
        if sampler[0] == 0.2:
            assert got[0, 0].item() in (20000 + torch.arange(5) * 7).tolist(), sampler
            assert got[0, 1].item() == 30001 and got[0, 2].item() == V - 1, sampler


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_draft_small_select_boundary(dtype, backend):
    """Staged sets of 127, 128 and 129 entries on both sides of kSmallSelect =
    128 (apd/cuda/sampling.cuh: one-pass select_small up to it, the radix
    passes above): exact ties at the top (half of them kept by index at top-p
    0.5) and distinct values (a cut by count, by mass, and by mass inside
    the top-k)."""
    emu_quick(backend, dtype == torch.bfloat16)
    V = 4099
    g = torch.Generator().manual_seed(43)
    x = torch.full((1, 6, V), -30.0)
    for r, n in enumerate((127, 128, 129)):
        idx = torch.randperm(V, generator=g)[:n]
        x[0, r, idx] = 1.0  # n exact ties
        x[0, r + 3, idx] = torch.linspace(0.0, 2.0, n)[torch.randperm(n, generator=g)]  # n distinct
    logits = x.to(dtype).to(DEV)
    seq = seq_inputs(1, 6, 43, full=True)
    for sampler in [(1.0, 0, 0.5, None), (0.3, 0, 0.9, None), (1.0, 60, 1.0, None), (1.0, 100, 0.7, None),
                    (1.0, 0, 0.5, "official")]:
        check_sample_draft(logits, seq, sampler)


def test_sample_draft_staging_threshold_ties(backend):
    """The staging threshold of a top-k row sits on the smallest x of a
    first-level bin (here 1.0: the 4th largest of the threads' maxima); at
    tau = 1.7, x = nextafter(1.0, 0) divides to the same fp32 z, so those
    entries tie with 1.0 and, at lower indices, are the ones the tie rule
    keeps. Staging only x >= 1.0 would keep the wrong entry."""
    V, M = 4099, 24
    below = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))
    assert torch.tensor(1.0) / 1.7 == torch.tensor(below) / 1.7  # fp32: the premise of the test
    x = torch.full((1, M, V), -30.0)
    x[..., [400, 800, 1200]] = 1.1  # threads 100, 200, 300 (4 entries per thread and tile)
    x[..., 1600] = 1.0  # thread 400
    x[..., [201, 241, 281]] = below  # threads 50, 60, 70: lower indices than 1600
    seq = seq_inputs(1, M, 9, full=True)
    for sampler in [(1.7, 4, 1.0, None), (1.7, 4, 0.99, None), (1.7, 5, 1.0, None)]:
        check_sample_draft(x.to(DEV), seq, sampler)


def bad_row_logits(V, dtype):
    x = torch.randn(1, 5, V).to(dtype)
    x[0, 0, V // 2] = float("nan")
    x[0, 1] = float("-inf")
    x[0, 2, 3] = float("inf")
    x[0, 3, : V - 1] = float("-inf")  # one finite entry: a good row
    return x.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_draft_bad_rows(dtype, backend):
    emu_quick(backend, dtype != torch.float32)
    V = 4099
    logits = bad_row_logits(V, dtype)
    seq = seq_inputs(1, 5, 3, full=True)
    for sampler in SAMPLERS:
        got = check_sample_draft(logits, seq, sampler).cpu()
        assert got[0, :3].tolist() == [-1, -1, -1], sampler
        assert got[0, 3].item() == V - 1, sampler
        assert 0 <= got[0, 4].item() < V, sampler


def check_mixture(d, a, draft, seq, *, R, sampler, eos_ids=None, acceptance=None):
    tau, top_k, top_p, compat = sampler
    kw = dict(R=R, temperature=tau, top_k=top_k, top_p=top_p, acceptance=acceptance, compat=compat)
    eos_dev = None if eos_ids is None else torch.tensor(eos_ids, dtype=torch.int64, device=DEV)
    t_cuda, n_cuda = OPS.mixture_accept(d, a, draft, *seq, eos_ids=eos_dev, **kw)
    t_cpu, _ = ops.mixture_accept(d.cpu(), a.cpu(), draft.cpu(), *cpu(seq), eos_ids=eos_ids, **kw)
    _, _, fragile = reference.mixture_accept_impl(d.cpu(), a.cpu(), draft.cpu(), *cpu(seq), eos_ids=eos_ids, **kw)
    what = f"mixture_accept {d.dtype} {tuple(d.shape)}/{a.shape[-1]} R={R} {sampler} {acceptance}"
    argmax_mode = acceptance == "argmax" or (acceptance is None and compat == "official")
    assert_ids_match(t_cuda, t_cpu, fragile, what, exact=argmax_mode)
    # n_accept is the scan of the CUDA targets, exactly.
    V = min(d.shape[-1], a.shape[-1])
    n_ref = reference._accept_scan(draft.cpu(), t_cuda.cpu(), seq[1].cpu(), eos_ids, V)
    assert n_cuda.dtype == torch.int64 and n_cuda.shape == (d.shape[0],)
    assert torch.equal(n_cuda.cpu(), n_ref), f"{what}: n_accept {n_cuda.tolist()} vs {n_ref.tolist()}"
    return t_cuda.cpu(), n_cuda.cpu()


MIX_SAMPLERS = [s for s in SAMPLERS if s[3] is None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("B,M,V_D,V_A", [(1, 1, 7, 7), (3, 100, 509, 509), (3, 7, 509, 500), (2, 3, 152064, 151936)])
def test_mixture_accept_matches_cpu(B, M, V_D, V_A, dtype, R, backend):
    emu_quick(backend, V_D < 100 or (dtype == torch.bfloat16 and V_D < 100000 and R in (0.3, 1.0)),
              profile_keep=V_A == 500 and dtype == torch.bfloat16 and R == 0.3)
    seed = B + M + V_D
    M = emu_rows(backend, M)
    d = make_logits(B, M, V_D, dtype, seed=seed)
    a = make_logits(B, M, V_A, dtype, seed=seed + 5)
    seq = seq_inputs(B, M, seed)
    for sampler in MIX_SAMPLERS:
        # The draft is the dLLM's own sample: R = 1 must accept every valid row.
        draft = OPS.sample_draft(d, *seq, temperature=sampler[0], top_k=sampler[1], top_p=sampler[2])
        draft = torch.where(draft < 0, 0, draft)
        target, n = check_mixture(d, a, draft, seq, R=R, sampler=sampler)
        if R == 1.0 and V_A == V_D:
            assert torch.equal(n, seq[1].cpu().clamp(min=0)), (sampler, n, seq[1])
        for acc in ("argmax",):
            check_mixture(d, a, draft, seq, R=R, sampler=sampler, acceptance=acc)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixture_accept_official_eos_strided(dtype, backend):
    emu_quick(backend, dtype == torch.bfloat16)
    B, M, V_D, V_A = 3, 17, 2053, 2048
    d = make_logits(B, M, V_D, dtype, seed=21, layout="padded")
    a = make_logits(B, M, V_A, dtype, seed=22, layout="transposed")
    seq = seq_inputs(B, M, 21, int32=True)
    draft = OPS.sample_draft(d, *seq, temperature=0.2, top_k=0, top_p=0.95)
    draft = torch.where(draft < 0, V_D - 1, draft)  # ids >= V_A never match
    eos = [int(draft[0, 2]), 5]
    for sampler in SAMPLERS:
        check_mixture(d, a, draft, seq, R=1.0 if sampler[3] is None else 0.5, sampler=sampler, eos_ids=eos)
    # With equal vocabularies R = 1 accepts the whole valid prefix, cut just
    # after the first EOS (row 2 of sequence 0, or earlier).
    a_full = make_logits(B, M, V_D, dtype, seed=23)
    _, n = check_mixture(d, a_full, draft, seq, R=1.0, sampler=(0.2, 0, 0.95, None), eos_ids=eos)
    first_eos = [i for i in range(M) if int(draft[0, i]) in eos]
    assert n[0].item() == min(M, first_eos[0] + 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixture_accept_bad_rows(dtype, backend):
    emu_quick(backend, dtype == torch.float16)
    V = 4099
    d = bad_row_logits(V, dtype)
    a = make_logits(1, 5, V, dtype, seed=4)
    seq = seq_inputs(1, 5, 4, full=True)
    draft = torch.zeros(1, 5, dtype=torch.int64, device=DEV)
    for acc in ("coupled", "argmax"):
        target, n = check_mixture(d, a, draft, seq, R=0.5, sampler=(0.7, 20, 0.9, None), acceptance=acc)
        assert target[0, :3].tolist() == [-1, -1, -1], acc
        assert n.item() >= 1  # a_0 = 1 even when target_0 is -1


def fused_max_rows(V, dtype):
    """[1, 6, V] dLLM and AR rows that stress the coupled mixture's staging from
    the lse pass (mixture_target_kernel skips its max pass: the lse pass
    bounds max m from below, the staging pass takes the exact max)."""
    g = torch.Generator().manual_seed(31)
    d = torch.randn(1, 6, V, generator=g) * 3.0
    a = torch.randn(1, 6, V, generator=g) * 3.0
    d[0, 0] = 0.0  # flat: every entry ties, the stage overflows -> the max pass after all
    a[0, 0] = 0.0
    a[0, 1] = d[0, 1] + 0.1 * torch.randn(V, generator=g)  # the models agree (APD's usual case)
    top = d[0, 2].topk(8).indices
    a[0, 2, top] = float("-inf")  # the dLLM's favourites are masked in the AR row: m = -inf there
    d[0, 3] = torch.round(d[0, 3] * 2.0) / 2.0  # coarse: ties at the cut
    a[0, 3] = torch.round(a[0, 3] * 2.0) / 2.0
    d[0, 4, 3:] = float("-inf")  # three finite entries in the mixture
    return d.to(dtype).to(DEV), a.to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixture_accept_staging_from_lse_pass(dtype, backend):
    emu_quick(backend, dtype == torch.bfloat16)
    V = 4099
    d, a = fused_max_rows(V, dtype)
    seq = seq_inputs(1, 6, 31, full=True)
    draft = torch.zeros(1, 6, dtype=torch.int64, device=DEV)
    # top_k 600 > 512: no staging from the threads' bounds, the max pass runs.
    for sampler in [(0.7, 0, 0.9, None), (0.2, 0, 0.95, None), (0.2, 600, 1.0, None), (0.7, 50, 1.0, None),
                    (0.2, 20, 0.95, None), (1.3, 3, 0.5, None)]:
        for R in (0.3, 0.7):
            target, _ = check_mixture(d, a, draft, seq, R=R, sampler=sampler, acceptance="coupled")
            assert target[0, 4].item() in (0, 1, 2), (sampler, R)
            assert target[0, 2].item() not in d[0, 2].float().topk(8).indices.tolist(), (sampler, R)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixture_accept_one_read(dtype, backend):
    """The coupled mixture at the paper's setting (the default top-p alone, 0 <
    R < 1) stages its candidates in the lse pass, with y = R d + (1 - R) a for
    m and thresholds from a running max of y (row_lse<T, true>), and falls
    back to staging from the hint when it cannot prove the result. Rows (d = a
    in rows 0-2, so m = d - lse and y = d): 300 early entries staged at the
    first tiles' max and dropped once the max is known (row 0); 2000 early
    ones that overflow the stage, fallback (row 1); the max at the last mixed
    index (row 2); independent N(0, 3) rows (row 3); the AR row masks the
    dLLM's favourites with -inf (row 4); the models agree up to noise (row
    5). tau 1e-4 fails the rounding check (fallback); the AR row is 37
    entries shorter (the lse over each row, the mixture over the shorter)."""
    emu_quick(backend, dtype == torch.bfloat16)
    V, V_A = 40000, 39963
    g = torch.Generator().manual_seed(47)
    d = torch.randn(1, 6, V, generator=g) * 0.5 - 10.0
    d[0, 0, torch.randperm(8000, generator=g)[:300]] = 3.0
    d[0, 0, 100] = 5.0
    late = (20000 + torch.arange(5) * 7).tolist()
    d[0, 0, late] = 8.0 - torch.arange(5) * 0.1
    d[0, 1, torch.randperm(8000, generator=g)[:2000]] = 3.0
    d[0, 1, 100] = 5.0
    d[0, 1, 30001] = 8.0
    d[0, 2, V_A - 1] = 2.0
    d[0, 3:] = torch.randn(3, V, generator=g) * 3.0
    a = d[:, :, :V_A].clone()
    a[0, 3] = torch.randn(V_A, generator=g) * 3.0
    a[0, 4, d[0, 4, :V_A].topk(8).indices] = float("-inf")
    a[0, 5] += 0.1 * torch.randn(V_A, generator=g)
    d, a = d.to(dtype).to(DEV), a.to(dtype).to(DEV)
    seq = seq_inputs(1, 6, 47, full=True)
    draft = torch.zeros(1, 6, dtype=torch.int64, device=DEV)
    for sampler in [(0.2, 0, 0.95, None), (0.2, 0, 0.5, None), (0.7, 0, 0.9, None), (1e-4, 0, 0.95, None)]:
        for R in (0.3, 0.7):
            target, _ = check_mixture(d, a, draft, seq, R=R, sampler=sampler, acceptance="coupled")
            if sampler[0] == 0.2:
                assert target[0, 0].item() in late, (sampler, R)
                assert target[0, 1].item() == 30001 and target[0, 2].item() == V_A - 1, (sampler, R)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_row_settings_match_rows_alone(dtype, backend):
    """[B] tensor settings (every sampler mode, R 0 / 0.25 / 0.5 / 1, both
    acceptances, compat="official", per-row stop ids [B, E]) in one launch:
    each row bit-identical to its own launch with its scalars (which the
    other tests hold to the CPU kernel)."""
    emu_quick(backend, True, profile_keep=dtype == torch.bfloat16)
    B, M, V = 9, emu_rows(backend, 3), 263
    d = make_logits(B, M, V, dtype, seed=28, layout="padded")
    a = make_logits(B, M, V - 4, dtype, seed=29)
    a[:, :, : V // 2] += d[:, :, : V // 2]  # correlated rows: some drafts get accepted
    seq = seq_inputs(B, M, 28)
    rows = sampling_rows.mixed_settings(B, DEV)
    draft, target, n = sampling_rows.check_per_row(OPS, d, a, *seq, rows)
    # The CPU kernel takes the same per-row call to the same ids on the rows that
    # compute bit-identical values everywhere (temperature 0 drafts, argmax targets).
    cpu_d = ops.sample_draft(d.cpu(), *cpu(seq), **sampling_rows.draft_kwargs(
        {k: v.cpu() for k, v in rows.items()}))
    greedy = rows["temperature"].cpu() == 0
    assert greedy.any() and torch.equal(draft.cpu()[greedy], cpu_d[greedy])


def test_accept_prefix_matches_reference():
    g = torch.Generator().manual_seed(5)
    B, M = 7, 64
    draft = torch.randint(-1, 6, (B, M), generator=g)
    target = torch.where(torch.rand(B, M, generator=g) < 0.9, draft, torch.randint(-1, 6, (B, M), generator=g))
    valid_len = torch.randint(0, M + 1, (B,), generator=g)
    for eos in (None, [3], [2, 4]):
        for vl in (valid_len, valid_len.to(torch.int32)):
            eos_dev = None if eos is None else torch.tensor(eos, device=DEV)
            got = OPS.accept_prefix(draft.to(DEV), target.to(DEV), vl.to(DEV), eos_dev)
            want = reference.accept_prefix(draft, target, vl, eos)
            assert torch.equal(got.cpu(), want), (eos, got, want)


def test_batch_invariance():
    """A sequence's output does not depend on the rest of the batch or its index."""
    B, M, V = 4, 9, 3001
    logits = make_logits(B, M, V, torch.bfloat16, seed=31)
    seq = seq_inputs(B, M, 31)
    kw = dict(temperature=0.7, top_k=30, top_p=0.9)
    full = OPS.sample_draft(logits, *seq, **kw)
    perm = torch.tensor([2, 0, 3, 1], device=DEV)
    permuted = OPS.sample_draft(logits[perm], *[t[perm] for t in seq], **kw)
    assert torch.equal(permuted, full[perm])
    for b in range(B):
        one = OPS.sample_draft(logits[b : b + 1], *[t[b : b + 1] for t in seq], **kw)
        assert torch.equal(one, full[b : b + 1])


# A request alone and inside batches of other requests (DESIGN.md §8, on the
# CUDA kernels): its draft ids, targets and n_accept are bit-identical. The
# grid is one CTA per (sequence, row) of B x M, with M padded to the batch's
# longest window: rows past valid_len only write -1, and a row's CTA (512
# threads, its reductions over V, its noise from its own seed / step /
# position) and the n_accept scan over its own valid_len never see B or M.
# Requests: (valid rows, pos_start, seed, step); the batches put mates with
# longer / shorter / empty windows around the tracked one, padding rows hold
# other logits.
INV_REQUESTS = [(3, 17, 11, 5), (6, 200, -7, 2**33), (1, 0, 3, 0), (0, 9, 4, 1), (4, 3000, 2**61, 77)]
# (position of the tracked request, mates: indices into the other requests)
INV_BATCHES = [(0, [0]), (1, [1, 0, 2]), (2, [3, 2]), (1, [2, 3, 1, 0])]
INV_SAMPLERS = [(0.7, 30, 0.9, None), (0.2, 0, 0.95, None)]  # top-k + top-p; the paper's default top-p (staged)


def _inv_batch(reqs, slack, V_D, V_A, seed):
    """reqs: [(spec, (d [m, V_D], a [m, V_A], draft [m]))] -> the batched inputs on DEV."""
    g = torch.Generator().manual_seed(seed)
    B, M = len(reqs), max(1, max(spec[0] for spec, _ in reqs)) + slack
    d = torch.randn(B, M, V_D, generator=g) * 3  # padding rows: other logits
    a = torch.randn(B, M, V_A, generator=g) * 3
    draft = torch.randint(0, V_A, (B, M), generator=g)
    for b, ((m, *_), (db, ab, xb)) in enumerate(reqs):
        d[b, :m], a[b, :m], draft[b, :m] = db, ab, xb
    col = lambda i: torch.tensor([spec[i] for spec, _ in reqs], dtype=torch.int64)  # noqa: E731
    seq = [col(1), col(0), col(2), col(3)]  # pos_start, valid_len, seeds, steps
    return d.to(torch.bfloat16).to(DEV), a.to(torch.bfloat16).to(DEV), draft.to(DEV), [t.to(DEV) for t in seq]


@pytest.mark.parametrize("sampler", INV_SAMPLERS, ids=["topk_topp", "paper_topp"])
def test_batch_invariance_mixed_batches(sampler, backend):
    """A request's sample_draft ids and mixture_accept targets / n_accept are
    the same alone (B = 1, M = its own rows) and inside batches with other
    requests around it (B = 2..5, M padded to the longest window plus slack),
    bit for bit; its padding rows are -1."""
    emu_quick(backend, sampler[2] < 0.95)
    tau, top_k, top_p, compat = sampler
    V_D, V_A = 3001, 2999
    g = torch.Generator().manual_seed(61)
    own = [(torch.randn(m, V_D, generator=g) * 3, torch.randn(m, V_A, generator=g) * 3,
            torch.randint(0, V_A, (m,), generator=g)) for m, *_ in INV_REQUESTS]
    kw = dict(temperature=tau, top_k=top_k, top_p=top_p, compat=compat)
    eos = torch.tensor([5], device=DEV)

    def run(reqs, slack, seed):
        d, a, draft, seq = _inv_batch(reqs, slack, V_D, V_A, seed)
        ids = OPS.sample_draft(d, *seq, **kw)
        target, n_acc = OPS.mixture_accept(d, a, draft, *seq, R=0.6, eos_ids=eos, **kw)
        return ids.cpu(), target.cpu(), n_acc.cpu()

    checked = 0
    for t in (0, 1):  # the tracked requests
        m = INV_REQUESTS[t][0]
        alone = run([(INV_REQUESTS[t], own[t])], 0, 900 + t)
        others = [i for i in range(len(INV_REQUESTS)) if i != t]
        for bi, (pos, mates) in enumerate(INV_BATCHES):
            reqs = [(INV_REQUESTS[others[i]], own[others[i]]) for i in mates]
            reqs.insert(pos, (INV_REQUESTS[t], own[t]))
            got = run(reqs, 2 * bi, 1000 + bi)
            for name, x, y in zip(("draft", "target"), got[:2], alone[:2]):
                assert torch.equal(x[pos, :m], y[0, :m]), (t, bi, name, x[pos, :m], y[0, :m])
                assert torch.all(x[pos, m:] == -1), (t, bi, name)
            assert got[2][pos] == alone[2][0], (t, bi, "n_accept", got[2][pos], alone[2][0])
            checked += 1
    assert checked == 2 * len(INV_BATCHES), checked


def test_opcheck(backend):
    if backend == "emu":
        not_applicable("opcheck is about the torch.ops.apd CUDA registration")
    B, M, V = 2, 3, 257
    d = make_logits(B, M, V, torch.bfloat16, seed=41)
    a = make_logits(B, M, V - 2, torch.bfloat16, seed=42)
    pos_start, valid_len, seeds, steps = seq_inputs(B, M, 41)
    draft = torch.randint(0, V, (B, M), device=DEV)
    eos = torch.tensor([1, 2], device=DEV)
    torch.library.opcheck(
        torch.ops.apd.sample_draft.default, (d, pos_start, valid_len, seeds, steps, 0.7, 20, 0.9, "")
    )
    torch.library.opcheck(
        torch.ops.apd.mixture_accept.default,
        (d, a, draft, pos_start, valid_len, seeds, steps, 0.6, 0.7, 20, 0.9, eos, "coupled", ""),
    )
    torch.library.opcheck(torch.ops.apd.accept_prefix.default, (draft, draft, valid_len, eos))


def test_cuda_graph_mixture_accept(backend):
    """mixture_accept never syncs with the host, so it captures into a CUDA graph;
    replays follow in-place updates of the inputs."""
    if backend == "emu":
        not_applicable("CUDA graphs need a device")
    B, M, V_D, V_A = 2, 8, 152064, 151936
    d = make_logits(B, M, V_D, torch.bfloat16, seed=51)
    a = make_logits(B, M, V_A, torch.bfloat16, seed=52)
    pos_start, valid_len, seeds, steps = seq_inputs(B, M, 51)
    draft = ops.sample_draft(d, pos_start, valid_len, seeds, steps, temperature=0.2, top_p=0.95).clamp(min=0)
    eos = torch.tensor([7], device=DEV)
    args = (d, a, draft, pos_start, valid_len, seeds, steps, 0.7, 0.2, 0, 0.95, eos, "coupled", "")
    eager = torch.ops.apd.mixture_accept(*args)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.apd.mixture_accept(*args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = torch.ops.apd.mixture_accept(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out[0], eager[0]) and torch.equal(static_out[1], eager[1])

    d.copy_(make_logits(B, M, V_D, torch.bfloat16, seed=53))
    steps.add_(1)
    graph.replay()
    torch.cuda.synchronize()
    fresh = torch.ops.apd.mixture_accept(*args)
    assert torch.equal(static_out[0], fresh[0]) and torch.equal(static_out[1], fresh[1])


# Banned ids (SEMANTICS.md "Banned ids"): the device kernels against the CPU
# kernels with the same range; the ranges straddle a 4-entry load group,
# start at 0, reach past V_A, and (152k) are Qwen3's 151665-151668. The
# banned ids are raised above every other entry so that a missed ban shows.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V_D,V_A,ban", [(509, 509, (3, 7)), (509, 500, (0, 1)), (509, 500, (497, 509)),
                                         (152064, 151936, (151665, 151669))])
def test_banned_ids_match_cpu(V_D, V_A, ban, dtype, backend):
    emu_quick(backend, V_D < 1000 and (dtype == torch.bfloat16 or ban == (3, 7)))
    B, M = 2, emu_rows(backend, 12)
    lo, hi = ban
    seq = seq_inputs(B, M, V_D + lo)
    for layout in ("contiguous", "padded"):
        d = make_logits(B, M, V_D, dtype, seed=lo + 1, layout=layout)
        a = make_logits(B, M, V_A, dtype, seed=lo + 2, layout=layout)
        d[..., lo:hi] = d.float().amax(-1, keepdim=True).to(dtype) + 4
        a[..., lo:min(hi, V_A)] = a.float().amax(-1, keepdim=True).to(dtype) + 4
        for sampler in SAMPLERS:
            tau, top_k, top_p, compat = sampler
            kw = dict(temperature=tau, top_k=top_k, top_p=top_p, compat=compat, banned=ban)
            got = OPS.sample_draft(d, *seq, **kw)
            want = ops.sample_draft(d.cpu(), *cpu(seq), **kw)
            _, fragile = reference.sample_draft_impl(d.cpu(), *cpu(seq), **kw)
            assert_ids_match(got, want, fragile, f"banned {ban} {dtype} {layout} {sampler}", exact=tau == 0.0)
            assert not ((got >= lo) & (got < hi)).any()
        free = OPS.sample_draft(d, *seq, temperature=0.7)  # unbanned: the raised ids, never accepted
        for sampler in MIX_SAMPLERS[:4]:
            for R in (0.0, 0.3, 1.0):
                for acc in (None, "argmax"):
                    tau, top_k, top_p, compat = sampler
                    kw = dict(R=R, temperature=tau, top_k=top_k, top_p=top_p, acceptance=acc, banned=ban)
                    t_dev, n_dev = OPS.mixture_accept(d, a, free, *seq, **kw)
                    t_cpu, _ = ops.mixture_accept(d.cpu(), a.cpu(), free.cpu(), *cpu(seq), **kw)
                    _, _, fragile = reference.mixture_accept_impl(d.cpu(), a.cpu(), free.cpu(), *cpu(seq), **kw)
                    assert_ids_match(t_dev, t_cpu, fragile, f"mixture banned {ban} {layout} {kw}",
                                     exact=acc == "argmax")
                    assert not ((t_dev >= lo) & (t_dev < hi)).any()
                    n_ref = reference._accept_scan(free.cpu(), t_dev.cpu(), seq[1].cpu(), None, min(V_D, V_A))
                    assert torch.equal(n_dev.cpu(), n_ref)
