"""Reference APD loop: a plain transcription of Algorithm 1 of the APD paper
(Israel, Van den Broeck, Grover, 2025) and of ../shared/DESIGN.md §6, run
through transformers' own Qwen2 modules and the pure-PyTorch reference ops.
None of apd_ext's kernels or runtime is used here. It is the oracle of the
end-to-end tests and the baseline of bench/bench_e2e.py; it favours clarity
over speed.

- The dLLM (Dream) is a Qwen2 network run bidirectionally: we pass an
  all-zero additive 4D mask (every query sees every key), and read its logits
  shifted by one position (position i is predicted from the hidden state at
  i - 1).
- Both models keep a transformers DynamicCache. The dLLM's cache holds the
  stale prefix [0, left); the verifier's holds [0, t-1) of committed tokens.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from apd_ext import reference as ref

# Keys of a Dream config.json that name the Dream class rather than the network.
_DREAM_ONLY = ("architectures", "model_type", "auto_map", "mask_token_id", "transformers_version")


def load_hf_model(path: str, *, dtype=torch.float32, device="cpu", attn_implementation="eager"):
    """A Qwen2ForCausalLM from a Qwen2 or Dream checkpoint folder, plus the
    folder's config.json as a dict. A Dream folder is read as the Qwen2 network
    it is (same weight names); its extra fields (mask_token_id) stay in the dict."""
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    config = Qwen2Config(**{k: v for k, v in raw.items() if k not in _DREAM_ONLY})
    model = Qwen2ForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True)
    return model.to(device).eval(), raw


def _crop(cache: DynamicCache, length: int) -> None:
    """Keep positions [0, length) of a DynamicCache (5.x crop takes a count to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@dataclass
class ReferenceResult:
    tokens: List[int]  # prompt + generated (first EOS included)
    num_generated: int
    accepted_per_step: List[int] = field(default_factory=list)


@torch.no_grad()
def reference_generate(dllm: Qwen2ForCausalLM, verifier: Qwen2ForCausalLM, prompt: List[int], *,
                       mask_token_id: int, eos_token_ids: List[int], R: float = 0.7,
                       W: Optional[int] = 16, M: int = 100, temperature: float = 0.2,
                       top_p: float = 0.95, top_k: int = 0, acceptance: Optional[str] = "coupled",
                       compat: Optional[str] = None, max_new_tokens: int = 256, seed: int = 0,
                       n_accept_override: Optional[int] = None,
                       max_steps: Optional[int] = None, trace: Optional[list] = None) -> ReferenceResult:
    """APD for one prompt (a list of ids). Same arguments as APDConfig;
    n_accept_override fixes the accepted count per step and max_steps stops
    after that many steps (both for benchmarking only). trace (tests): a list
    that gets (left, right, n_accept) per step."""
    if compat == "official":
        acceptance = None  # the released code's argmax acceptance
    device = dllm.device
    P = len(prompt)
    L = P + max_new_tokens
    x = torch.full((1, L), mask_token_id, dtype=torch.long, device=device)  # committed ids, then [MASK]
    x[0, :P] = torch.tensor(prompt, dtype=torch.long)
    one = lambda v: torch.tensor([v], dtype=torch.long, device=device)  # noqa: E731
    seeds = one(seed if seed < 2**63 else seed - 2**64)

    dllm_cache = DynamicCache() if W is not None else None
    ver_cache = DynamicCache()
    if P > 1:  # prefill the verifier with x_0 .. x_{P-2}
        verifier(input_ids=x[:, : P - 1], position_ids=torch.arange(P - 1, device=device)[None],
                 cache=ver_cache, use_cache=True)

    t, n_prev, step = P, 0, 0
    accepted: List[int] = []
    while t < L:
        # 1. Window: recompute [left, right); the dLLM cache supplies [0, left).
        right = min(t + M, L)
        if step == 0 or W is None:
            left = 0
        else:
            left = max(t - n_prev - W + 1, 0)
        m = right - t
        if dllm_cache is not None:
            _crop(dllm_cache, left)
        full = torch.zeros(1, 1, right - left, right, dtype=dllm.dtype, device=device)  # attend to all
        # Shifted logits: the row of position p-1 predicts position p, for p in [t, right),
        # so only window rows t-1-left .. right-2-left go through the LM head.
        rows = torch.arange(t - 1 - left, right - 1 - left, device=device)
        out = dllm(input_ids=x[:, left:right], position_ids=torch.arange(left, right, device=device)[None],
                   attention_mask={"full_attention": full}, cache=dllm_cache,
                   use_cache=dllm_cache is not None, logits_to_keep=rows)
        dllm_logits = out.logits.float()  # [1, m, V_D]

        # 2. Draft every masked position of the window from the dLLM marginals.
        draft = ref.sample_draft(dllm_logits, one(t), one(m), seeds, one(step), temperature=temperature,
                                 top_k=top_k, top_p=top_p, compat=compat)  # [1, m]
        bad = (draft[0] < 0).nonzero()
        if bad.numel():
            raise RuntimeError(f"step {step}: the dLLM logits row for position {t + int(bad[0])} is not "
                               "finite (draft id -1)")

        # 3. The verifier scores the draft in one causal pass: [x_{t-1}, x̂_t .. x̂_{t+m-2}].
        _crop(ver_cache, t - 1)
        # Ids the verifier cannot embed (the dLLM's padding rows >= V_A) are fed as
        # V_A - 1; such a draft is never accepted past the step's first token.
        v_in = torch.cat([x[:, t - 1 : t], draft[:, : m - 1]], dim=1).clamp(0, verifier.config.vocab_size - 1)
        ver_logits = verifier(input_ids=v_in, position_ids=torch.arange(t - 1, t - 1 + m, device=device)[None],
                              cache=ver_cache, use_cache=True).logits.float()  # [1, m, V_A]

        # 4. Mixture target with the draft's noise; accept the agreeing prefix.
        _, n = ref.mixture_accept(dllm_logits, ver_logits, draft, one(t), one(m), seeds, one(step), R=R,
                                  temperature=temperature, top_k=top_k, top_p=top_p,
                                  eos_ids=list(eos_token_ids), acceptance=acceptance, compat=compat)
        n = int(n[0])
        if n_accept_override is not None:
            n = min(n_accept_override, m)
        if n < 1:  # a_0 = 1: a step that accepts nothing would repeat forever
            raise RuntimeError(f"step {step}: accepted {n} tokens at position {t}; the first drafted "
                               "token is always accepted, so the loop must advance every step")
        if trace is not None:
            trace.append((left, right, n))

        # 5. Commit, advance, stop at EOS or at the budget.
        x[0, t : t + n] = draft[0, :n]
        accepted.append(n)
        new = draft[0, :n].tolist()
        t += n
        n_prev = n
        step += 1
        if any(v in eos_token_ids for v in new):
            break
        if max_steps is not None and step >= max_steps:
            break
    return ReferenceResult(tokens=x[0, :t].tolist(), num_generated=t - P, accepted_per_step=accepted)


def reference_generate_from_paths(dllm_path: str, verifier_path: str, prompt: List[int], *,
                                  dtype=torch.float32, device="cpu", eos_token_ids=None, **kwargs):
    """Load both folders with transformers and run reference_generate."""
    dllm, raw = load_hf_model(dllm_path, dtype=dtype, device=device)
    verifier, _ = load_hf_model(verifier_path, dtype=dtype, device=device)
    if raw.get("mask_token_id") is None:
        raise ValueError(f"{dllm_path}: expected a dLLM config.json with mask_token_id, found none")
    if eos_token_ids is None:
        eos = raw.get("eos_token_id")
        eos_token_ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
    return reference_generate(dllm, verifier, prompt, mask_token_id=int(raw["mask_token_id"]),
                              eos_token_ids=eos_token_ids, **kwargs)
