"""The chunked-prefill semantics of docs/SEMANTICS.md ("Chunked prefill"),
transcribed independently of the Engine: transformers' Qwen2 modules with a
DynamicCache and the pure-PyTorch reference ops (apd_ext.reference), as
apd_ext.reference_loop does for the unchunked loop. Test-only.

    from chunked_reference import chunked_reference

The transcription, clause by clause:
- chunks [0, N), [N, 2N), ...; the last starts at c = N * floor((P - 1) / N);
  only P > N with W not None is chunked (else c = 0 and this is the
  reference loop itself);
- each chunk [a, a + N) with a < c: one dLLM forward whose rows attend to
  [0, a + N) (an all-zero additive mask over the cache plus the chunk),
  appended to the dLLM's cache; no token, no step;
- the verifier's cache holds [0, P - 1) before step 0 (it is causal, so one
  whole prefill is the same math as the chunks);
- step 0 has left = c; every later step follows DESIGN §6.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from transformers import DynamicCache

from apd_ext import reference as ref


def _crop(cache: DynamicCache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _bidirectional(dllm, ids, start, end, cache):
    """dLLM forward over positions [start, end) that see [0, end) (cache + these)."""
    full = torch.zeros(1, 1, end - start, end, dtype=dllm.dtype)
    return dllm(input_ids=ids[:, start:end], position_ids=torch.arange(start, end)[None],
                attention_mask={"full_attention": full}, cache=cache, use_cache=cache is not None)


@torch.no_grad()
def chunked_reference(dllm, verifier, prompt: List[int], *, chunk: Optional[int], mask_token_id: int,
                      eos_token_ids: List[int], R: float, W: Optional[int], M: int, temperature: float,
                      top_p: float = 1.0, top_k: int = 0, acceptance: Optional[str] = "coupled",
                      compat: Optional[str] = None, max_new_tokens: int, seed: int):
    """APD for one prompt with chunked prefill (chunk None: unchunked). Returns
    (generated ids, accepted per step, left of each step)."""
    if compat == "official":
        acceptance = None
    P = len(prompt)
    L = P + max_new_tokens
    x = torch.full((1, L), mask_token_id, dtype=torch.long)
    x[0, :P] = torch.tensor(prompt)
    one = lambda v: torch.tensor([v], dtype=torch.long)  # noqa: E731
    seeds = one(seed if seed < 2**63 else seed - 2**64)

    c = 0 if chunk is None or W is None or P <= chunk else chunk * ((P - 1) // chunk)
    dllm_cache = DynamicCache() if W is not None else None
    for a in range(0, c, chunk or 1):  # the prefill chunks, causal order between them
        _bidirectional(dllm, x, a, a + chunk, dllm_cache)
    ver_cache = DynamicCache()
    if P > 1:
        verifier(input_ids=x[:, : P - 1], position_ids=torch.arange(P - 1)[None], cache=ver_cache, use_cache=True)

    t, n_prev, step = P, 0, 0
    accepted, lefts = [], []
    while t < L:
        right = min(t + M, L)
        if step == 0:
            left = c
        elif W is None:
            left = 0
        else:
            left = max(t - n_prev - W + 1, 0)
        m = right - t
        if dllm_cache is not None:
            _crop(dllm_cache, left)
        rows = torch.arange(t - 1 - left, right - 1 - left)
        full = torch.zeros(1, 1, right - left, right, dtype=dllm.dtype)
        d = dllm(input_ids=x[:, left:right], position_ids=torch.arange(left, right)[None],
                 attention_mask={"full_attention": full}, cache=dllm_cache, use_cache=dllm_cache is not None,
                 logits_to_keep=rows).logits.float()  # [1, m, V_D]
        draft = ref.sample_draft(d, one(t), one(m), seeds, one(step), temperature=temperature, top_k=top_k,
                                 top_p=top_p, compat=compat)  # [1, m]
        assert int(draft.min()) >= 0, "non-finite dLLM row"
        _crop(ver_cache, t - 1)
        v_in = torch.cat([x[:, t - 1 : t], draft[:, : m - 1]], 1).clamp(0, verifier.config.vocab_size - 1)
        a = verifier(input_ids=v_in, position_ids=torch.arange(t - 1, t - 1 + m)[None], cache=ver_cache,
                     use_cache=True).logits.float()  # [1, m, V_A]
        _, n = ref.mixture_accept(d, a, draft, one(t), one(m), seeds, one(step), R=R, temperature=temperature,
                                  top_k=top_k, top_p=top_p, eos_ids=list(eos_token_ids), acceptance=acceptance,
                                  compat=compat)
        n = int(n[0])
        assert n >= 1
        x[0, t : t + n] = draft[0, :n]
        new = draft[0, :n].tolist()
        accepted.append(n)
        lefts.append(left)
        t, n_prev, step = t + n, n, step + 1
        if any(v in eos_token_ids for v in new):
            break
    return x[0, P:t].tolist(), accepted, lefts
