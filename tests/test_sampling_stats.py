"""Statistical tests of the CPU sampler: the empirical distribution of
sample_draft over >= 200k draws on a small vocabulary matches
filter(softmax(l / tau)) (DESIGN.md §4), and filtered-out tokens are never drawn.

Draws vary the seed (per sequence), the step (per call) and the position (per
row); the logits row is one [V] vector broadcast with stride 0.

Bound: Pearson chi-square over the kept tokens, dof = kept - 1 <= 5, must stay
below 40 (the 1e-6 upper quantile of chi2 with 5 dof is ~35.9, so a correct
sampler fails this less than once in a million runs), and the total-variation
distance must be below 0.01 (the expected TV at 2e5 draws is ~0.002).
"""
import pytest
import torch

from apd_ext import ops

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
CHI2_MAX = 40.0
TV_MAX = 0.01


def _expected(temperature, top_k, top_p, compat):
    """filter(softmax(l / tau)) in fp64 from its definition (sort, cumulate, cut);
    compat="official" draws from softmax(l / tau^2) over the kept set."""
    z = LOGITS.double() / temperature
    p = torch.softmax(z, 0)
    order = torch.argsort(-z, stable=True)
    cum = p[order].cumsum(0)
    V = len(z)
    if compat == "official":
        n = int((cum < top_p * cum[-1]).sum()) + 1 if top_p < 1 else V
        n = min(n, top_k) if top_k > 0 else n
    else:
        K = top_k if 0 < top_k < V else V
        n = int((cum[:K] < top_p * cum[K - 1]).sum()) + 1 if top_p < 1 else K
    kept = torch.zeros(V, dtype=torch.bool)
    kept[order[:n]] = True
    w = torch.softmax(LOGITS.double() / temperature**2, 0) if compat == "official" else p
    w = torch.where(kept, w, 0.0)
    return w / w.sum()


@pytest.mark.parametrize(
    "temperature,top_k,top_p,compat",
    [(1.0, 0, 0.8, None), (0.7, 3, 1.0, None), (1.5, 6, 0.9, None), (0.8, 5, 0.9, "official")],
)
def test_draft_distribution(temperature, top_k, top_p, compat):
    B, M, calls = 64, 256, 13  # 212,992 draws
    V = LOGITS.numel()
    logits = LOGITS.reshape(1, 1, V).expand(B, M, V)
    gen = torch.Generator().manual_seed(2024)
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen, dtype=torch.int64)
    pos_start = torch.randint(0, 4096, (B,), generator=gen)
    valid_len = torch.full((B,), M)
    counts = torch.zeros(V, dtype=torch.float64)
    for step in range(calls):
        steps = torch.full((B,), 1000 + step, dtype=torch.int64)
        draft = ops.sample_draft(logits, pos_start, valid_len, seeds, steps, temperature=temperature,
                                 top_k=top_k, top_p=top_p, compat=compat)
        counts += torch.bincount(draft.flatten(), minlength=V).double()
    n = counts.sum()
    assert n == B * M * calls
    want = _expected(temperature, top_k, top_p, compat)
    assert (counts[want == 0] == 0).all(), f"filtered-out tokens drawn: {counts.tolist()}"
    kept = want > 0
    assert 2 <= int(kept.sum()) <= 6
    chi2 = float((((counts - n * want) ** 2)[kept] / (n * want[kept])).sum())
    tv = 0.5 * float((counts / n - want).abs().sum())
    assert chi2 < CHI2_MAX, (chi2, (counts / n).tolist(), want.tolist())
    assert tv < TV_MAX, tv


def test_target_marginal_matches_mixture():
    """The coupled target's marginal is filter(softmax(m / tau)) with
    m = R logsoftmax(d) + (1 - R) logsoftmax(a)."""
    B, M, calls = 64, 256, 13
    V = LOGITS.numel()
    ar = torch.tensor([-1.0, 2.0, 0.0, 1.0, -2.0, 0.5, 0.0, 1.0])
    R, temperature, top_p = 0.6, 0.9, 0.85
    d = LOGITS.reshape(1, 1, V).expand(B, M, V)
    a = ar.reshape(1, 1, V).expand(B, M, V)
    m = R * torch.log_softmax(LOGITS.double(), 0) + (1 - R) * torch.log_softmax(ar.double(), 0)
    p = torch.softmax(m / temperature, 0)
    order = torch.argsort(-p, stable=True)
    n_keep = int((p[order].cumsum(0) < top_p).sum()) + 1
    want = torch.zeros(V, dtype=torch.float64)
    want[order[:n_keep]] = p[order[:n_keep]]
    want /= want.sum()
    gen = torch.Generator().manual_seed(7)
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen, dtype=torch.int64)
    pos_start = torch.randint(0, 4096, (B,), generator=gen)
    valid_len = torch.full((B,), M)
    draft = torch.zeros(B, M, dtype=torch.int64)
    counts = torch.zeros(V, dtype=torch.float64)
    for step in range(calls):
        steps = torch.full((B,), step, dtype=torch.int64)
        target, _ = ops.mixture_accept(d, a, draft, pos_start, valid_len, seeds, steps, R=R,
                                       temperature=temperature, top_p=top_p)
        counts += torch.bincount(target.flatten(), minlength=V).double()
    n = counts.sum()
    assert (counts[want == 0] == 0).all()
    kept = want > 0
    chi2 = float((((counts - n * want) ** 2)[kept] / (n * want[kept])).sum())
    assert chi2 < CHI2_MAX and 0.5 * float((counts / n - want).abs().sum()) < TV_MAX, chi2
