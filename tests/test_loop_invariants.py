"""The decode loops' progress invariant: a live sequence accepts >= 1 token per
step (a_0 = 1), so every loop ends. An acceptance that returns 0 must raise at
once, naming the step and the position, never spin (the timeout marks are the
backstop: a regression fails in seconds, not at the suite's timeout)."""
from types import SimpleNamespace

import pytest
import torch

import apd_ext
from apd_ext import ops
from apd_ext import reference as ref
from apd_ext.decoding.scheduler import check_progress
from apd_ext.reference_loop import reference_generate
from tests.model_utils import make_tiny_dream, make_tiny_qwen2

MASK = 508
PROMPT = [(3 * i + 2) % 500 + 3 for i in range(12)]


def test_check_progress_names_step_sequence_and_position():
    t = torch.tensor([40, 17, 33])  # [n] host positions of the live rows
    live = torch.tensor([0, 5, 6])  # their batch indices
    check_progress(3, t, torch.tensor([1, 4, 2]), live)  # everyone advanced: no error
    with pytest.raises(RuntimeError, match=r"step 3: sequence 5 accepted 0 tokens at position 17"):
        check_progress(3, t, torch.tensor([2, 0, 0]), live)
    with pytest.raises(RuntimeError, match=r"step 0: sequence 1 accepted -1 tokens at position 17"):
        check_progress(0, t, torch.tensor([1, -1, 1]))  # live defaults to 0 .. n-1


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("inv_pair")
    hf_dllm = make_tiny_dream(root / "dream", seed=5, mask_token_id=MASK)
    hf_ver = make_tiny_qwen2(root / "qwen", seed=6)
    return SimpleNamespace(dllm=apd_ext.load_model(root / "dream"), verifier=apd_ext.load_model(root / "qwen"),
                           hf_dllm=hf_dllm, hf_verifier=hf_ver)


def _zero_after(k, real):
    """Wrap an acceptance op so that from its (k+1)-th call on it reports 0
    accepted tokens for the last sequence: the a_0 = 1 bug, in one step."""
    calls = [0]

    def op(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] <= k:
            return out
        if isinstance(out, tuple):
            target, n = out
            return target, torch.cat([n[:-1], torch.zeros_like(n[-1:])])
        return torch.cat([out[:-1], torch.zeros_like(out[-1:])])
    return op


@pytest.mark.timeout(60)
def test_apd_raises_instead_of_spinning(pair, monkeypatch):
    monkeypatch.setattr(ops, "mixture_accept", _zero_after(2, ops.mixture_accept))
    with pytest.raises(RuntimeError, match=r"step 2: sequence 1 accepted 0 tokens at position \d+"):
        apd_ext.generate(pair.dllm, pair.verifier, [PROMPT, PROMPT[:7]], R=0.5, W=2, M=4, max_new_tokens=12,
                         eos_token_ids=[])


@pytest.mark.timeout(60)
def test_leftright_raises_instead_of_spinning(pair, monkeypatch):
    monkeypatch.setattr(ops, "accept_prefix", _zero_after(0, ops.accept_prefix))
    with pytest.raises(RuntimeError, match=f"step 0: sequence 0 accepted 0 tokens at position {len(PROMPT)}"):
        apd_ext.generate_leftright(pair.dllm, [PROMPT], K=2, max_new_tokens=8, eos_token_ids=[])


@pytest.mark.timeout(60)
def test_reference_loop_raises_instead_of_spinning(pair, monkeypatch):
    monkeypatch.setattr(ref, "mixture_accept", _zero_after(1, ref.mixture_accept))
    with pytest.raises(RuntimeError, match=r"step 1: accepted 0 tokens at position \d+"):
        reference_generate(pair.hf_dllm, pair.hf_verifier, PROMPT, mask_token_id=MASK, eos_token_ids=[],
                           R=0.5, W=2, M=4, max_new_tokens=12)
