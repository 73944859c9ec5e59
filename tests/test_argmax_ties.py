"""Exact ties of the perturbed argmax go to the lowest index (SEMANTICS.md
"Argmax returns the lowest index among equal maxima").

With constant logits 2^20 and tau = 1/8, every tempered value is 2^23, where
the fp32 spacing is 1 (2^26 and spacing 8 for compat="official", which divides
by tau twice): z + g rounds to a few integers and the best score is shared by
several entries in most rows. Random logits almost never tie exactly, so
without this test a kernel where the highest index wins would pass.
"""
import pytest
import torch

from apd_ext import ops
from apd_ext import reference as ref

V = 61  # odd, not a multiple of the Philox block of 4
B, M = 3, 8
C = 2.0**20
TAU = 0.125  # a power of two: C / TAU and C / TAU / TAU are exact

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _inputs(device, dtype):
    logits = torch.full((B, M, V), C, dtype=dtype, device=device)  # [B, M, V]
    pos = torch.tensor([4, 100, 0], device=device)  # [B]
    valid = torch.tensor([M, 5, M], device=device)  # [B]
    seeds = torch.tensor([0, 5, -(2**63) + 1], device=device)  # [B] (uint64 bit patterns)
    steps = torch.tensor([0, 3, 2**33 + 7], device=device)  # [B]
    return logits, pos, valid, seeds, steps


def _expected(pos, valid, seeds, steps, z: float, top_k: int):
    """Lowest index among the maximal fp32 scores z + g over the kept entries
    (top_k of equal probabilities keeps the lowest top_k indices); -1 past
    valid_len. Also returns how many rows have a tie at the top."""
    want = torch.full((B, M), -1, dtype=torch.int64)
    ties = 0
    for b in range(B):
        for j in range(int(valid[b])):
            g = ref.gumbel_noise(seeds[b : b + 1].cpu(), steps[b : b + 1].cpu(), pos[b : b + 1].cpu() + j, V)[0]
            score = torch.tensor(z, dtype=torch.float32) + g  # [V] fp32 sums, as the kernels add
            if 0 < top_k < V:
                score[top_k:] = float("-inf")
            best = score.max()
            at_best = (score == best).nonzero().flatten()
            want[b, j] = int(at_best[0])
            ties += at_best.numel() > 1
    return want, ties


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compat,top_k", [(None, 0), (None, 7), ("official", 0)])
def test_exact_ties_go_to_the_lowest_index(device, dtype, compat, top_k):
    logits, pos, valid, seeds, steps = _inputs(device, dtype)
    z = C / TAU / TAU if compat == "official" else C / TAU
    want, ties = _expected(pos, valid, seeds, steps, z, top_k)
    assert ties >= 4, "the inputs must produce exact ties for the test to mean anything"
    kw = dict(temperature=TAU, top_k=top_k, top_p=1.0, compat=compat)
    got = ops.sample_draft(logits, pos, valid, seeds, steps, **kw)  # [B, M]
    assert torch.equal(got.cpu(), want)
    assert torch.equal(ref.sample_draft(logits.cpu(), pos.cpu(), valid.cpu(), seeds.cpu(), steps.cpu(), **kw), want)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_ties_in_the_coupled_target(device):
    # R = 1 makes the coupled mixture the dLLM logits themselves (no lse
    # shift, SEMANTICS.md), so the target ties exactly like the draft and must
    # pick the same lowest index; every valid row is then accepted.
    logits, pos, valid, seeds, steps = _inputs(device, torch.float32)
    want, ties = _expected(pos, valid, seeds, steps, C / TAU, 0)
    assert ties >= 4
    draft = want.to(device)
    target, n = ops.mixture_accept(logits, logits.clone(), draft, pos, valid, seeds, steps, R=1.0,
                                   temperature=TAU, top_p=1.0)
    assert torch.equal(target.cpu(), want)
    assert n.cpu().tolist() == valid.cpu().tolist()
