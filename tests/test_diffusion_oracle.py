"""generate_diffusion against a plain transcription of Dream's samplers, step by step.

The transcription follows the published description of Dream's
`_sample` loop (timesteps linspace(1, eps, steps + 1); at step i unmask
int(n_masked * (1 - s / t)) positions, all of them at the last step; the
positions are the most confident masked ones, where confidence is the drawn
token's probability (maskgit_plus), top-1 minus top-2 probability
(topk_margin) or the negative entropy (entropy); 'origin' unmasks each masked
position with probability 1 - s / t). It runs on transformers' Qwen2 module
(bidirectional, logits shifted by one), with plain torch ops, at temperature 0
(draft = argmax), where no shared noise is involved. Every step's unmasked
positions and the tokens are compared, over several steps with k < n_masked.
"""
from types import SimpleNamespace

import pytest
import torch

import apd_ext
from apd_ext import generate_diffusion
from tests.model_utils import make_tiny_dream

MASK = 508
PROMPT = [(11 * i + 5) % 500 + 3 for i in range(10)]
NEW = 13
STEPS = 5
EPS = 1e-3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff_pair")
    hf = make_tiny_dream(root / "dream", seed=7, mask_token_id=MASK)
    return SimpleNamespace(dllm=apd_ext.load_model(root / "dream"), hf=hf)


def _top_p_probs(logits, top_p):
    """softmax over the smallest highest-first set whose mass reaches top_p
    (the first token always kept), everything else 0; logits [N, V] fp32."""
    p = torch.softmax(logits, -1)
    if top_p >= 1.0:
        return p
    sp, order = torch.sort(p, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sp, -1) - sp  # mass strictly before each sorted entry
    keep_sorted = before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    q = torch.where(keep, p, 0.0)
    return q / q.sum(-1, keepdim=True)


@torch.no_grad()
def _transcription(hf, prompt, steps, alg, top_p, seed, invert=False):
    """Per step: the sorted absolute positions unmasked; and the final ids.
    invert: pick the least confident positions (to show the test can tell)."""
    P, L = len(prompt), len(prompt) + NEW
    x = torch.tensor([prompt + [MASK] * NEW])  # [1, L]
    full = torch.zeros(1, 1, L, L)  # additive mask: every query sees every key
    ts = torch.linspace(1.0, EPS, steps + 1, dtype=torch.float64)
    rng = torch.Generator().manual_seed(seed)
    trace = []
    for i in range(steps):
        masked = [p for p in range(P, L) if int(x[0, p]) == MASK]
        if not masked:
            break
        logits = hf(input_ids=x, attention_mask={"full_attention": full}).logits[0].float()  # [L, V]
        rows = logits[[p - 1 for p in masked]]  # [nm, V]: position p is predicted at row p - 1
        x0 = rows.argmax(-1)  # temperature 0: argmax, lowest index on ties
        nm = len(masked)
        t, s = float(ts[i]), float(ts[i + 1])
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1.0
            draw = torch.rand(nm, generator=rng)
            pick = [masked[j] for j in range(nm) if float(draw[j]) < p_transfer]
            vals = {masked[j]: int(x0[j]) for j in range(nm)}
        else:
            probs = _top_p_probs(rows, top_p)  # [nm, V]
            if alg == "maskgit_plus":
                conf = probs[torch.arange(nm), x0]
            elif alg == "topk_margin":
                srt = probs.sort(-1, descending=True).values
                conf = srt[:, 0] - srt[:, 1]
            else:  # entropy: sum p log p, the higher the more certain
                conf = torch.where(probs > 0, probs * probs.log(), 0.0).sum(-1)
            k = int(nm * (1 - s / t)) if i < steps - 1 else nm
            best = sorted(range(nm), key=lambda j: float(conf[j]) if invert else -float(conf[j]))[:k]
            pick = [masked[j] for j in best]
            vals = {masked[j]: int(x0[j]) for j in range(nm)}
        for p in pick:
            x[0, p] = vals[p]
        trace.append(sorted(pick))
    return trace, x[0].tolist()


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_matches_transcription_step_by_step(pair, alg, top_p):
    seed = 4
    want_trace, want_ids = _transcription(pair.hf, PROMPT, STEPS, alg, top_p, seed)
    trace = []
    out = generate_diffusion(pair.dllm, [PROMPT], steps=STEPS, alg=alg, temperature=0.0, top_p=top_p,
                             seed=seed, max_new_tokens=NEW, eos_token_ids=[], _trace=trace)
    assert trace == want_trace
    assert out.sequences[0, : len(PROMPT) + NEW].tolist() == want_ids
    assert out.accepted_per_step[0] == [len(s) for s in want_trace]
    # The comparison has teeth: several steps unmask a strict, non-empty subset.
    partial = [s for s in want_trace[:-1] if 0 < len(s)]
    assert len(partial) >= 2, want_trace


def test_the_oracle_tells_the_orders_apart(pair):
    # At the first step, for each confidence rule, the k most confident masked
    # positions are not the k least confident ones, and the rules do not all
    # agree: a sampler with the wrong rule or an inverted order cannot match
    # the transcription above by accident.
    firsts = {}
    for alg in ("maskgit_plus", "topk_margin", "entropy"):
        most = _transcription(pair.hf, PROMPT, STEPS, alg, 1.0, 0)[0][0]
        least = _transcription(pair.hf, PROMPT, STEPS, alg, 1.0, 0, invert=True)[0][0]
        assert most and most != least, alg
        firsts[alg] = tuple(most)
    assert len(set(firsts.values())) >= 2, firsts
