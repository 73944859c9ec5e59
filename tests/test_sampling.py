"""CPU sampling core (sample_draft, mixture_accept, accept_prefix) against the
pure-PyTorch reference, token for token (DESIGN.md §4, docs/SEMANTICS.md).

Exact comparison; a mismatch is allowed only on a row the reference marks
fragile: the top-p cut within 1e-5 of its boundary mass, or the best two
scores within 1e-5 relative (SEMANTICS.md "Ties and order"). The fraction of
fragile rows is bounded so that no case passes vacuously.
"""
import pytest
import sampling_rows
import torch

from apd_ext import ops, reference as ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (temperature, top_k, top_p): argmax, plain Gumbel, top-k, top-p, both, and a
# small temperature with a large top_k (the kernel's top-k cut past its
# candidate set, i.e. its whole-row path).
SAMPLERS = ((0.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 5, 1.0), (0.5, 0, 0.9), (1.3, 40, 0.8), (0.05, 300, 1.0))
MAX_FRAGILE = 0.1


def _logits(shape, dtype, gen, strided=False, scale=3.0):
    """Random logits with exact ties (bf16/fp16 rounding and copied maxima);
    strided=True returns a view with non-unit strides in every dimension."""
    B, M, V = shape
    x = torch.randn(B, M, V, generator=gen) * scale
    if V > 3:  # a tie at the max in every other row
        x[:, ::2, V // 2] = x[:, ::2].amax(-1)
    x = x.to(dtype)
    if not strided:
        return x
    big = torch.zeros(M, B, 2 * V, dtype=dtype)
    big[:, :, ::2] = x.transpose(0, 1)
    return big.transpose(0, 1)[:, :, ::2]


def _rows(B, M, gen, full=False):
    pos_start = torch.randint(0, 1000, (B,), generator=gen)
    valid_len = torch.full((B,), M) if full else torch.randint(0, M + 1, (B,), generator=gen)
    valid_len[0] = M
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen, dtype=torch.int64)
    steps = torch.randint(0, 2**40, (B,), generator=gen, dtype=torch.int64)
    return pos_start, valid_len.to(torch.int32), seeds, steps.to(torch.int64)


def _assert_matches(got, want, fragile, what):
    bad = (got != want) & ~fragile
    assert not bad.any(), f"{what}: {int(bad.sum())} mismatches at {bad.nonzero()[:5].tolist()}"
    if fragile.numel() >= 50:  # small cases may be all ties; big ones must not be
        assert fragile.float().mean() <= MAX_FRAGILE, f"{what}: too many fragile rows"


# ---------------------------------------------------------------------------
# Reference generator
# ---------------------------------------------------------------------------


def test_reference_philox_known_answers():
    r = ref.philox4x32_10(0, 0, 0, 0, 0, 0)
    assert [int(x) for x in r] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    r = ref.philox4x32_10(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert [int(x) for x in r] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    r = ref.philox4x32_10(*([0xFFFFFFFF] * 6))
    assert [int(x) for x in r] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_reference_noise_layout():
    # Entry v uses word v % 4 of counter (v // 4, pos, step_lo, step_hi), key (seed_lo, seed_hi);
    # the same vector as tests/cpp/test_philox.cpp.
    seed, step, pos, v = 0x0123456789ABCDEF, 0x100000002, 77, 4 * 1000 + 3
    words = ref.noise_words(torch.tensor([seed]), torch.tensor([step]), torch.tensor([pos]), v + 1)
    direct = ref.philox4x32_10(1000, 77, 2, 1, 0x89ABCDEF, 0x01234567)
    assert int(words[0, v]) == int(direct[3])
    g = ref.gumbel_noise(torch.tensor([seed]), torch.tensor([step]), torch.tensor([pos]), 64)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


# ---------------------------------------------------------------------------
# sample_draft
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("V", [1, 7, 509])
def test_sample_draft_matches_reference(V, dtype):
    gen = torch.Generator().manual_seed(V * 7 + DTYPES.index(dtype))
    case = 0
    for B, M in ((1, 1), (3, 3), (1, 100), (3, 100)):
        for temperature, top_k, top_p in SAMPLERS:
            for compat in ((None, "official") if M == 3 else (None,) if case % 2 else ("official",)):
                case += 1
                logits = _logits((B, M, V), dtype, gen, strided=case % 2 == 0)
                rows = _rows(B, M, gen)
                kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, compat=compat)
                got = ops.sample_draft(logits, *rows, **kw)
                want, fragile = ref.sample_draft_impl(logits, *rows, **kw)
                assert got.shape == (B, M) and got.dtype == torch.int64
                _assert_matches(got, want, fragile, f"B={B} M={M} {kw}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
@pytest.mark.parametrize("sampler", ((0.2, 0, 0.95), (0.7, 0, 1.0), (1.0, 50, 0.9)))
def test_sample_draft_full_vocab(sampler, dtype):
    temperature, top_k, top_p = sampler
    gen = torch.Generator().manual_seed(11)
    B, M, V = 1, 3, 152064
    logits = _logits((B, M, V), dtype, gen, scale=2.5)
    rows = _rows(B, M, gen, full=True)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    got = ops.sample_draft(logits, *rows, **kw)
    want, fragile = ref.sample_draft_impl(logits, *rows, **kw)
    assert not ((got != want) & ~fragile).any()


def test_sample_draft_bad_rows():
    V = 33
    logits = torch.randn(1, 6, V)
    logits[0, 0, 5] = float("nan")
    logits[0, 1, 7] = float("inf")
    logits[0, 2] = float("-inf")
    logits[0, 3, :30] = float("-inf")  # finite max: a good row
    rows = (torch.tensor([0]), torch.tensor([5]), torch.tensor([3]), torch.tensor([1]))
    for kw in (dict(), dict(temperature=0.7), dict(temperature=0.7, top_p=0.9, top_k=3),
               dict(temperature=0.7, top_p=0.9, compat="official")):
        got = ops.sample_draft(logits, *rows, **kw)
        assert got[0, :3].tolist() == [-1, -1, -1], kw
        assert 30 <= int(got[0, 3]) < V
        assert int(got[0, 5]) == -1  # beyond valid_len
        assert torch.equal(got, ref.sample_draft(logits, *rows, **kw))


def test_ties_keep_lowest_index():
    # All-equal row: argmax is index 0; top_k = 2 keeps exactly indices 0 and 1.
    B, M, V = 1, 256, 40
    logits = torch.zeros(B, M, V, dtype=torch.bfloat16)
    rows = (torch.tensor([0]), torch.tensor([M]), torch.tensor([5]), torch.tensor([9]))
    assert (ops.sample_draft(logits, *rows) == 0).all()
    got = ops.sample_draft(logits, *rows, temperature=1.0, top_k=2)
    assert set(got.flatten().tolist()) == {0, 1}
    # top_p = 0.125 (exact in fp32) over 40 equal entries keeps the 5 lowest indices.
    got = ops.sample_draft(logits, *rows, temperature=1.0, top_p=0.125)
    assert set(got.flatten().tolist()) <= set(range(5)) and len(set(got.flatten().tolist())) > 1
    # -0.0 and +0.0 are equal values: a tie, lowest index wins.
    z = torch.tensor([[[-1.0, -0.0, 0.0, -2.0]]])
    assert int(ops.sample_draft(z, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([0]))) == 1


# ---------------------------------------------------------------------------
# mixture_accept / accept_prefix
# ---------------------------------------------------------------------------

MIXTURES = (  # (R, acceptance, compat)
    (0.7, "coupled", None), (0.3, "coupled", None), (0.0, "coupled", None), (1.0, "coupled", None),
    (0.7, "argmax", None), (0.6, None, "official"),
)


def _check_mixture(dl, al, draft, rows, eos, kw):
    target, n = ops.mixture_accept(dl, al, draft, *rows, eos_ids=eos, **kw)
    want_t, want_n, fragile = ref.mixture_accept_impl(dl, al, draft, *rows, eos_ids=eos, **kw)
    _assert_matches(target, want_t, fragile, f"target {kw}")
    V = min(dl.shape[-1], al.shape[-1])
    # The scan is exact given the kernel's own target, and equal to the reference's
    # wherever no target row of the sequence is fragile.
    assert torch.equal(n, ref._accept_scan(draft, target, rows[1], eos, V))
    stable = ~fragile.any(-1)
    assert torch.equal(n[stable], want_n[stable]), kw
    return target, n


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("V_D,V_A", [(1, 1), (7, 7), (509, 509), (509, 500)])
def test_mixture_accept_matches_reference(V_D, V_A, dtype):
    gen = torch.Generator().manual_seed(V_D + V_A + DTYPES.index(dtype))
    case = 0
    for B, M in ((1, 1), (3, 3), (3, 100)):
        for i, (R, acceptance, compat) in enumerate(MIXTURES):
            for temperature, top_k, top_p in (SAMPLERS[i % 6], SAMPLERS[(i + B + M) % 6]):
                case += 1
                dl = _logits((B, M, V_D), dtype, gen, strided=case % 2 == 0)
                # The AR model roughly agrees with the dLLM, so prefixes get long.
                al = (dl.float()[..., :V_A] + 0.5 * torch.randn(B, M, V_A, generator=gen)).to(dtype)
                if case % 3 == 0:
                    al = al.transpose(0, 1).contiguous().transpose(0, 1)
                rows = _rows(B, M, gen)
                sk = dict(temperature=temperature, top_k=top_k, top_p=top_p, compat=compat)
                draft = ops.sample_draft(dl, *rows, **sk)
                eos = [int(draft[0, M // 2])] if M > 2 and case % 2 else None
                _check_mixture(dl, al, draft, rows, eos, dict(R=R, acceptance=acceptance, **sk))


def test_mixture_accept_full_vocab():
    gen = torch.Generator().manual_seed(5)
    B, M, V_D, V_A = 1, 3, 152064, 151936
    dl = _logits((B, M, V_D), torch.bfloat16, gen, scale=2.5)
    al = (dl.float()[..., :V_A] + 0.3 * torch.randn(B, M, V_A, generator=gen)).to(torch.bfloat16)
    rows = _rows(B, M, gen, full=True)
    sk = dict(temperature=0.2, top_p=0.95)
    draft = ops.sample_draft(dl, *rows, **sk)
    for R, acceptance in ((0.7, "coupled"), (0.7, "argmax")):
        _check_mixture(dl, al, draft, rows, None, dict(R=R, acceptance=acceptance, **sk))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_R1_accepts_every_valid_row(sampler):
    temperature, top_k, top_p = sampler
    gen = torch.Generator().manual_seed(3)
    B, M, V = 3, 64, 301
    dl = _logits((B, M, V), torch.bfloat16, gen)
    al = torch.randn(B, M, V, generator=gen).to(torch.bfloat16)  # an unrelated AR model
    rows = _rows(B, M, gen)
    sk = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    draft = ops.sample_draft(dl, *rows, **sk)
    target, n = ops.mixture_accept(dl, al, draft, *rows, R=1.0, **sk)
    assert torch.equal(target, draft)
    assert torch.equal(n, rows[1].to(torch.int64))


def test_eos_cuts_accepted_prefix():
    gen = torch.Generator().manual_seed(4)
    B, M, V = 2, 40, 97
    dl = _logits((B, M, V), torch.float32, gen)
    rows = _rows(B, M, gen, full=True)
    draft = ops.sample_draft(dl, *rows, temperature=0.8)
    eos = int(draft[0, 10])
    target, n = ops.mixture_accept(dl, dl, draft, *rows, R=1.0, temperature=0.8, eos_ids=[eos, 10**9])
    first = [(draft[b] == eos).nonzero()[0].item() + 1 if (draft[b] == eos).any() else M for b in range(B)]
    assert n.tolist() == first and n[0] <= 11
    assert torch.equal(n, ref.mixture_accept(dl, dl, draft, *rows, R=1.0, temperature=0.8, eos_ids=[eos])[1])
    # The same through accept_prefix, with an eos tensor.
    assert torch.equal(ops.accept_prefix(draft, target, rows[1], torch.tensor([eos])), n)


def test_mixture_bad_rows_and_short_vocab():
    B, M, V_D, V_A = 1, 4, 20, 12
    dl = torch.randn(B, M, V_D)
    al = torch.randn(B, M, V_A)
    dl[0, 1, 3] = float("nan")          # bad dLLM row
    al[0, 2, :] = float("-inf")         # bad AR row
    draft = torch.tensor([[15, 4, 4, 4]])  # 15 >= V_A never matches
    rows = (torch.tensor([9]), torch.tensor([4]), torch.tensor([1]), torch.tensor([2]))
    for acceptance in ("coupled", "argmax"):
        target, n = ops.mixture_accept(dl, al, draft, *rows, R=0.5, temperature=0.9, acceptance=acceptance)
        assert target[0, 1] == -1 and target[0, 2] == -1
        assert ((target[0] >= -1) & (target[0] < V_A)).all()
        assert int(n[0]) == 1  # a_0 = 1, row 1 is bad -> no match
        want = ref.mixture_accept(dl, al, draft, *rows, R=0.5, temperature=0.9, acceptance=acceptance)
        assert torch.equal(target, want[0]) and torch.equal(n, want[1])


def test_accept_prefix_matches_reference():
    gen = torch.Generator().manual_seed(8)
    B, M = 64, 12
    draft = torch.randint(-1, 4, (B, M), generator=gen)
    target = torch.where(torch.rand(B, M, generator=gen) < 0.8, draft, torch.randint(-1, 4, (B, M), generator=gen))
    valid_len = torch.randint(0, M + 1, (B,), generator=gen)
    for eos in (None, [2], torch.tensor([0, 3])):
        got = ops.accept_prefix(draft, target, valid_len, eos)
        assert torch.equal(got, ref.accept_prefix(draft, target, valid_len, eos))
    assert (ops.accept_prefix(draft, target, valid_len)[valid_len == 0] == 0).all()


# ---------------------------------------------------------------------------
# Batch invariance
# ---------------------------------------------------------------------------


def test_batch_invariance():
    gen = torch.Generator().manual_seed(9)
    B, M, V = 4, 17, 1001
    dl = _logits((B, M, V), torch.bfloat16, gen)
    al = _logits((B, M, V), torch.bfloat16, gen)
    pos, vl, sd, st = _rows(B, M, gen)
    vl[2] = M - 3
    sk = dict(temperature=0.6, top_k=30, top_p=0.9)
    draft = ops.sample_draft(dl, pos, vl, sd, st, **sk)
    target, n = ops.mixture_accept(dl, al, draft, pos, vl, sd, st, R=0.5, eos_ids=[3], **sk)
    for b in range(B):
        one = slice(b, b + 1)
        d1 = ops.sample_draft(dl[one], pos[one], vl[one], sd[one], st[one], **sk)
        t1, n1 = ops.mixture_accept(dl[one], al[one], d1, pos[one], vl[one], sd[one], st[one], R=0.5, eos_ids=[3], **sk)
        assert torch.equal(d1[0], draft[b]) and torch.equal(t1[0], target[b]) and n1[0] == n[b]
    # Reversed batch order, different neighbours: the same per-sequence output.
    rev = torch.arange(B - 1, -1, -1)
    d2 = ops.sample_draft(dl[rev], pos[rev], vl[rev], sd[rev], st[rev], **sk)
    assert torch.equal(d2, draft[rev])


# ---------------------------------------------------------------------------
# Per-row settings ([B] tensors): each row as if it ran alone with its scalars
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_per_row_settings_match_rows_alone(dtype, strided):
    gen = torch.Generator().manual_seed(28)
    B, M, V = 11, 5, 263  # odd sizes; B > len(ROW_MODES): modes repeat on other rows
    dl = _logits((B, M, V), dtype, gen, strided=strided)
    al = _logits((B, M, V - 4), dtype, gen, strided=strided)
    al[:, :, :V // 2] += dl[:, :, :V // 2]  # correlated rows: some drafts get accepted
    pos, vl, sd, st = _rows(B, M, gen)
    rows = sampling_rows.mixed_settings(B, "cpu", eos_pool=(3, 5, 11))
    draft, target, n = sampling_rows.check_per_row(ops, dl, al, pos, vl, sd, st, rows,
                                                   banned=(7, 9) if strided else None)
    # A float64 R is the Python float exactly: under compat="official" the
    # released code's 1 - R is fp64 (for these R, float(1 - R) differs from
    # 1 - R taken from R rounded to fp32).
    off = dict(temperature=0.0, compat="official", eos_ids=[3])
    R64 = torch.tensor([0.058, 0.109, 0.132] * 4, dtype=torch.float64)[:B]
    t64, n64 = ops.mixture_accept(dl, al, draft, pos, vl, sd, st, R=R64, **off)
    for b in range(B):
        one = slice(b, b + 1)
        t1, n1 = ops.mixture_accept(dl[one], al[one], draft[one], pos[one], vl[one], sd[one], st[one],
                                    R=float(R64[b]), **off)
        assert torch.equal(t1[0], t64[b]) and n1[0] == n64[b]
    # The settings matter: one call with row 1's scalars for every row differs.
    uni = ops.sample_draft(dl, pos, vl, sd, st, **sampling_rows.row_scalars(rows, 1, False))
    assert not torch.equal(uni, draft)


def test_per_row_eos_padding_and_shared_list():
    """[B, E] stop ids: -1 pads and never matches (not even a bad row's -1
    draft); a [B, E] tensor with equal rows is the [E] list."""
    B, M = 3, 4
    draft = torch.tensor([[-1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]])
    vl = torch.full((B,), M)
    eos = torch.tensor([[-1, -1], [7, -1], [9, 3]])
    assert ops.accept_prefix(draft, draft, vl, eos).tolist() == [4, 3, 3]
    same = torch.tensor([[3, 7]] * B)
    assert torch.equal(ops.accept_prefix(draft, draft, vl, same), ops.accept_prefix(draft, draft, vl, [3, 7]))


# ---------------------------------------------------------------------------
# opcheck and bad inputs
# ---------------------------------------------------------------------------


def _opcheck_args():
    gen = torch.Generator().manual_seed(1)
    B, M, V = 2, 3, 37
    dl = torch.randn(B, M, V, generator=gen)
    al = torch.randn(B, M, V - 2, generator=gen)
    pos, vl, sd, st = _rows(B, M, gen)
    draft = torch.randint(0, V, (B, M), generator=gen)
    eos = torch.tensor([1, 2])
    return [
        (torch.ops.apd.sample_draft.default, (dl, pos, vl, sd, st, 0.7, 5, 0.9, "")),
        (torch.ops.apd.sample_draft.default, (dl.to(torch.bfloat16), pos, vl, sd, st, 0.0, 0, 1.0, "official")),
        (torch.ops.apd.mixture_accept.default,
         (dl, al, draft, pos, vl, sd, st, 0.7, 0.7, 0, 0.95, eos, "coupled", "")),
        (torch.ops.apd.mixture_accept.default,
         (dl, al, draft, pos, vl, sd, st, 0.7, 0.7, 3, 0.95, eos, "argmax", "official")),
        (torch.ops.apd.accept_prefix.default, (draft, draft.flip(1), vl, eos)),
        (torch.ops.apd.sample_draft.default, (dl, pos, vl, sd, st, 0.7, 5, 0.9, "", 3, 9)),
        (torch.ops.apd.mixture_accept.default,
         (dl, al, draft, pos, vl, sd, st, 0.7, 0.7, 0, 0.95, eos, "coupled", "", 30, 36)),
        # Per-row settings ([B] tensors) and per-row stop ids [B, E].
        (torch.ops.apd.sample_draft.default,
         (dl, pos, vl, sd, st, 0.0, 0, 1.0, "", 0, 0, torch.tensor([0.0, 0.7]), torch.tensor([0, 5]),
          torch.tensor([1.0, 0.9]), torch.tensor([0, 1]))),
        (torch.ops.apd.mixture_accept.default,
         (dl, al, draft, pos, vl, sd, st, 0.0, 0.0, 0, 1.0, torch.tensor([[1, -1], [2, 3]]), "coupled", "", 0, 0,
          torch.tensor([0.5, 0.3]), torch.tensor([0.7, 0.0]), torch.tensor([3, 0]), torch.tensor([0.9, 1.0]),
          torch.tensor([0, 1]), torch.tensor([0, 1]))),
        (torch.ops.apd.accept_prefix.default, (draft, draft.flip(1), vl, torch.tensor([[1, -1], [2, 3]]))),
    ]


@pytest.mark.parametrize("case", range(10))
def test_opcheck(case):
    op, args = _opcheck_args()[case]
    torch.library.opcheck(op, args)


def _bad_input_cases():
    B, M, V = 2, 3, 11
    dl = torch.randn(B, M, V)
    pos, vl, sd, st = torch.zeros(B, dtype=torch.int64), torch.full((B,), M), torch.zeros(B, dtype=torch.int64), torch.zeros(B, dtype=torch.int32)
    draft = torch.zeros(B, M, dtype=torch.int64)
    rows = (pos, vl, sd, st)
    sd_ = ops.sample_draft
    mx = lambda **kw: ops.mixture_accept(  # noqa: E731
        kw.pop("dl", dl), kw.pop("al", dl), kw.pop("draft", draft), *kw.pop("rows", rows), **{"R": 0.5, **kw})
    return [
        ("logits", lambda: sd_(dl.double(), *rows)),
        ("logits", lambda: sd_(dl[0], *rows)),
        ("logits", lambda: sd_(torch.randn(B, M, 0), *rows)),
        ("pos_start", lambda: sd_(dl, pos[:1], vl, sd, st)),
        ("valid_len", lambda: sd_(dl, pos, vl.float(), sd, st)),
        ("valid_len", lambda: sd_(dl, pos, torch.tensor([M + 1, 0]), sd, st)),
        ("valid_len", lambda: sd_(dl, pos, torch.tensor([-1, 0]), sd, st)),
        ("seeds", lambda: sd_(dl, pos, vl, sd.int(), st)),
        ("steps", lambda: sd_(dl, pos, vl, sd, [0, 0])),
        ("temperature", lambda: sd_(dl, *rows, temperature=-0.1)),
        ("temperature", lambda: sd_(dl, *rows, temperature=float("nan"))),
        ("top_k", lambda: sd_(dl, *rows, top_k=2.5)),
        ("top_p", lambda: sd_(dl, *rows, top_p=0.0)),
        ("top_p", lambda: sd_(dl, *rows, top_p=1.5)),
        ("compat", lambda: sd_(dl, *rows, compat="paper")),
        ("ar_logits", lambda: mx(al=dl.half())),
        ("ar_logits", lambda: mx(al=torch.randn(B, M + 1, V))),
        ("draft", lambda: mx(draft=draft.int())),
        ("draft", lambda: mx(draft=draft[:, :2])),
        ("R", lambda: mx(R=1.5)),
        ("R", lambda: mx(R=-0.1)),
        ("R", lambda: mx(R="0.5")),
        ("acceptance", lambda: mx(acceptance="greedy")),
        ("acceptance", lambda: mx(acceptance="coupled", compat="official")),
        ("eos_ids", lambda: mx(eos_ids=torch.tensor([[1]]))),
        ("eos_ids", lambda: mx(eos_ids=["2"])),
        ("valid_len", lambda: mx(rows=(pos, torch.tensor([4, 1]), sd, st))),
        ("target", lambda: ops.accept_prefix(draft, draft[:, :1], vl)),
        ("valid_len", lambda: ops.accept_prefix(draft, draft, torch.tensor([M + 1, 0]))),
        ("draft", lambda: ops.accept_prefix(draft.float(), draft, vl)),
        ("banned", lambda: sd_(dl, *rows, banned=(5, 3))),
        ("banned", lambda: sd_(dl, *rows, banned=(-1, 3))),
        ("banned", lambda: sd_(dl, *rows, banned=[151665])),
        ("banned", lambda: mx(banned=(True, 3))),
        # Per-row settings: dtype, shape, device and values name the argument.
        ("temperature", lambda: sd_(dl, *rows, temperature=torch.tensor([0.5, 0.5], dtype=torch.float64))),
        ("temperature", lambda: sd_(dl, *rows, temperature=torch.tensor([0.5]))),
        ("temperature", lambda: sd_(dl, *rows, temperature=torch.tensor([0.5, -1.0]))),
        ("temperature", lambda: sd_(dl, *rows, temperature=torch.tensor([0.5, float("inf")]))),
        ("top_k", lambda: sd_(dl, *rows, top_k=torch.tensor([1.0, 2.0]))),
        ("top_p", lambda: sd_(dl, *rows, top_p=torch.tensor([0.9, 0.0]))),
        ("compat", lambda: sd_(dl, *rows, compat=torch.tensor([0, 2]))),
        ("R", lambda: mx(R=torch.tensor([0.5, 1.5]))),
        ("R", lambda: mx(R=torch.tensor([[0.5, 0.5]]))),
        ("acceptance", lambda: mx(acceptance=torch.tensor([0, 3]))),
        ("acceptance", lambda: mx(acceptance=torch.tensor([1, 0]), compat=torch.tensor([1, 1]))),
        ("acceptance", lambda: mx(acceptance="coupled", compat=torch.tensor([0, 1]))),
        ("eos_ids", lambda: mx(eos_ids=torch.tensor([[1], [2], [3]]))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_input_cases())))
def test_bad_inputs_name_the_argument(case):
    name, call = _bad_input_cases()[case]
    with pytest.raises((ValueError, TypeError), match=f"^{name}:"):
        call()


def test_direct_op_checks_do_not_crash():
    # Direct torch.ops callers bypass the wrappers: the C++ checks must raise, not crash.
    B, M, V = 1, 2, 5
    dl = torch.randn(B, M, V)
    args = (torch.zeros(B, dtype=torch.int64), torch.tensor([M + 5]), torch.zeros(B, dtype=torch.int64),
            torch.zeros(B, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="valid_len"):
        torch.ops.apd.sample_draft(dl, *args, 0.5, 0, 1.0, "")
    with pytest.raises(RuntimeError, match="R must be"):
        torch.ops.apd.mixture_accept(dl, dl, torch.zeros(B, M, dtype=torch.int64), args[0], torch.tensor([1]),
                                     args[2], args[3], 2.0, 0.0, 0, 1.0, torch.empty(0, dtype=torch.int64),
                                     "coupled", "")


# ---------------------------------------------------------------------------
# Banned ids (SEMANTICS.md "Banned ids"): [start, end) read as logit -inf
# ---------------------------------------------------------------------------

BANS = ((3, 7), (0, 2), (500, 509), (200, 200))  # inside, at the start, at the end (past V_A = 500), empty


def _favour(x, lo, hi):
    """x with the ids [lo, hi) raised above every other entry: banning them must matter."""
    x = x.float().clone()
    x[..., lo:hi] = x.amax(-1, keepdim=True) + 4.0
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("ban", BANS, ids=str)
def test_banned_ids_are_never_drafted_and_equal_minus_inf(ban, dtype):
    gen = torch.Generator().manual_seed(ban[0] + 3 * DTYPES.index(dtype))
    B, M, V = 3, 40, 509
    lo, hi = ban
    dl = _favour(_logits((B, M, V), dtype, gen), lo, hi).to(dtype)
    rows = _rows(B, M, gen)
    inf = dl.clone()
    inf[..., lo:hi] = float("-inf")
    for temperature, top_k, top_p in SAMPLERS:
        for compat in (None, "official"):
            sk = dict(temperature=temperature, top_k=top_k, top_p=top_p, compat=compat)
            got = ops.sample_draft(dl, *rows, banned=ban, **sk)
            want, fragile = ref.sample_draft_impl(dl, *rows, banned=ban, **sk)
            _assert_matches(got, want, fragile, f"banned {ban} {sk}")
            assert not ((got >= lo) & (got < hi)).any()
            # exactly as if the logits were -inf (the same noise, the same filter)
            assert torch.equal(got, ops.sample_draft(inf, *rows, **sk)), sk
    if hi > lo:  # without the ban the favoured ids win the argmax
        free = ops.sample_draft(dl, *rows)
        valid = free >= 0  # rows past valid_len are -1
        assert valid.any() and ((free >= lo) & (free < hi))[valid].all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("ban", BANS, ids=str)
def test_banned_ids_are_never_targets_or_accepted(ban, dtype):
    gen = torch.Generator().manual_seed(7 + ban[0] + DTYPES.index(dtype))
    B, M, V_D, V_A = 3, 30, 509, 500
    lo, hi = ban
    dl = _favour(_logits((B, M, V_D), dtype, gen), lo, hi)
    al = _favour(dl[..., :V_A] + 0.5 * torch.randn(B, M, V_A, generator=gen), lo, hi)
    dl, al = dl.to(dtype), al.to(dtype)
    rows = _rows(B, M, gen)
    inf_d, inf_a = dl.clone(), al.clone()
    inf_d[..., lo:hi] = float("-inf")
    inf_a[..., lo:hi] = float("-inf")
    for i, (R, acceptance, compat) in enumerate(MIXTURES):
        temperature, top_k, top_p = SAMPLERS[i % len(SAMPLERS)]
        sk = dict(temperature=temperature, top_k=top_k, top_p=top_p, compat=compat)
        draft = ops.sample_draft(dl, *rows, **sk)  # unbanned: the favoured ids, which must never be accepted
        kw = dict(R=R, acceptance=acceptance, banned=ban, **sk)
        target, n = _check_mixture(dl, al, draft, rows, None, kw)
        assert not ((target >= lo) & (target < hi)).any(), kw
        hit = (draft >= lo) & (draft < hi)
        i_ = torch.arange(M)[None, :]
        assert not (hit & (i_ >= 1) & (i_ < n[:, None])).any(), kw  # a_0 aside, never accepted
        mixed_argmax = (acceptance == "argmax" or compat == "official") and R in (0.0, 1.0)
        if not mixed_argmax:  # there 0 * -inf makes an all -inf column NaN; a ban is -inf instead
            want_t, want_n = ops.mixture_accept(inf_d, inf_a, draft, *rows, R=R, acceptance=acceptance, **sk)
            assert torch.equal(target, want_t) and torch.equal(n, want_n), kw


def test_all_but_banned_minus_inf_is_a_bad_row():
    B, M, V = 1, 2, 11
    x = torch.full((B, M, V), float("-inf"))
    x[..., 4:6] = 1.0
    rows = (torch.zeros(B, dtype=torch.int64), torch.full((B,), M), torch.zeros(B, dtype=torch.int64),
            torch.zeros(B, dtype=torch.int64))
    for t in (0.0, 0.7):
        assert ops.sample_draft(x, *rows, temperature=t, banned=(4, 6)).tolist() == [[-1, -1]]
        assert ref.sample_draft(x, *rows, temperature=t, banned=(4, 6)).tolist() == [[-1, -1]]
        target, _ = ops.mixture_accept(x, x, torch.zeros(B, M, dtype=torch.int64), *rows, R=0.5, temperature=t,
                                       banned=(4, 6))
        assert target.tolist() == [[-1, -1]]
