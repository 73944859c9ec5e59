"""The checks every decoding entry point runs before any forward (DESIGN.md
§6, §7): model kinds and the pair, prompts (ragged lists, padded tensors with
an attention mask), token ids against both vocabularies, seeds, stop ids and
the sampling knobs. Bad input fails here with one error naming the argument."""
from __future__ import annotations

import warnings
from typing import List, Sequence

import torch

from apd_ext._validate import fail
from apd_ext.config import APDConfig
from apd_ext.models.compat import check_compatible


def model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if dev is not None:
        return torch.device(dev)
    return next(model.parameters()).device


def check_kind(argname: str, model, kind: str) -> None:
    got = getattr(model, "kind", None)
    if got != kind:
        what = "a diffusion LLM (kind 'dllm', e.g. Dream)" if kind == "dllm" else (
            "an autoregressive model (kind 'ar', e.g. Qwen2.5)")
        fail(argname, f"{what} loaded with apd_ext.load_model", f"kind {got!r} ({type(model).__name__})")
    if kind == "dllm" and getattr(model.config, "mask_token_id", None) is None:
        fail(f"{argname}.config.mask_token_id", "the dLLM's [MASK] token id", "None (no mask_token_id "
             "in the checkpoint's config.json)")


def seed_tensor(seed: int, batch: int, device: torch.device, seeds=None) -> torch.Tensor:
    """[B] int64 holding the uint64 seeds' bit patterns (DESIGN §3). seeds: None
    (every sequence gets `seed`: a sequence's tokens never depend on its batch
    index) or one int in [0, 2^64) per sequence (a list or a 1-D tensor)."""
    if seeds is None:
        vals = [int(seed)] * batch
    else:
        if isinstance(seeds, torch.Tensor):
            if seeds.dim() != 1 or seeds.dtype.is_floating_point or seeds.dtype == torch.bool:
                fail("seeds", f"a 1-D integer tensor of {batch} seeds",
                     f"shape {list(seeds.shape)} dtype {seeds.dtype}")
            seeds = seeds.tolist()
        try:
            vals = list(seeds)
        except TypeError:
            raise TypeError(f"seeds: expected None or a list of {batch} ints, got {type(seeds).__name__}") from None
        if len(vals) != batch:
            fail("seeds", f"{batch} seeds (one per prompt)", f"{len(vals)}")
        for i, v in enumerate(vals):
            if isinstance(v, bool) or not isinstance(v, int) or not (0 <= v < 2**64):
                fail(f"seeds[{i}]", "an int in [0, 2^64)", v)
    vals = [v - 2**64 if v >= 2**63 else v for v in vals]
    return torch.tensor(vals, dtype=torch.int64).to(device)


def _mask_rows(input_ids: torch.Tensor, attention_mask) -> List[torch.Tensor]:
    """[B, L] ids + [B, L] 0/1 mask -> the B prompts. Each mask row must be one
    contiguous run of ones touching either end (left or right padding)."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected None or a [B, L] tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        fail("attention_mask", f"shape {list(input_ids.shape)} (input_ids' shape)",
             f"shape {list(attention_mask.shape)}")
    m = attention_mask.detach().to("cpu")
    if m.dtype.is_floating_point or m.dtype.is_complex:
        fail("attention_mask", "an integer or bool tensor of 0/1", f"dtype {m.dtype}")
    m = m.to(torch.int64)
    if bool(((m != 0) & (m != 1)).any()):
        fail("attention_mask", "values 0 or 1", f"values in [{int(m.min())}, {int(m.max())}]")
    rows = []
    L = m.shape[1]
    for b in range(m.shape[0]):
        n = int(m[b].sum())
        if n == 0:
            fail(f"attention_mask[{b}]", "at least one 1 (a non-empty prompt)", "all zeros")
        ones = torch.ones(n, dtype=torch.int64)
        if torch.equal(m[b, :n], ones):  # right padding
            rows.append(input_ids[b, :n])
        elif torch.equal(m[b, L - n :], ones):  # left padding
            rows.append(input_ids[b, L - n :])
        else:
            fail(f"attention_mask[{b}]", "one run of ones at the start (right padding) or at the end "
                 "(left padding)", m[b].tolist())
    return rows


def normalize_prompts(input_ids, attention_mask=None) -> List[torch.Tensor]:
    """The B prompts as CPU int64 1-D tensors of >= 1 token each. input_ids: a
    LongTensor [B, L] (with an optional [B, L] attention_mask, left or right
    padded), a 1-D LongTensor (one prompt), or a list of 1-D prompts (tensors
    or lists of ints; ragged)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype not in (torch.int64, torch.int32):
            fail("input_ids", "an int64 tensor of token ids", f"dtype {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            if attention_mask is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
        if input_ids.dim() != 2 or input_ids.shape[0] < 1:
            fail("input_ids", "a [B, L] tensor (B >= 1) or a list of 1-D prompts", f"shape {list(input_ids.shape)}")
        ids = input_ids.detach().to("cpu", torch.int64)
        if ids.shape[1] < 1:
            fail("input_ids", "a prompt of at least one token", "an empty prompt")
        rows = list(ids) if attention_mask is None else _mask_rows(ids, attention_mask)
    elif isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            fail("attention_mask", "None when input_ids is a list of prompts (their lengths say it)",
                 type(attention_mask).__name__)
        if len(input_ids) == 0:
            fail("input_ids", "at least one prompt", "an empty list")
        if all(isinstance(v, int) for v in input_ids):
            input_ids = [input_ids]  # one prompt given as a flat list of ints
        rows = []
        for i, p in enumerate(input_ids):
            p = torch.as_tensor(p)
            if p.dim() != 1 or (p.numel() and p.dtype not in (torch.int64, torch.int32)):
                fail(f"input_ids[{i}]", "a 1-D sequence of int token ids", f"shape {list(p.shape)} dtype {p.dtype}")
            if p.numel() == 0:
                fail(f"input_ids[{i}]", "a prompt of at least one token", "an empty prompt")
            rows.append(p.to(torch.int64))
    else:
        raise TypeError(f"input_ids: expected a LongTensor [B, L] or a list of 1-D prompts, "
                        f"got {type(input_ids).__name__}")
    return [r.contiguous() for r in rows]


def check_prompt(prompts: List[torch.Tensor], models: Sequence, max_new_tokens) -> List[int]:
    """Token ids in range, prompts shorter than every model's context. Returns,
    per prompt, its total length (prompt + budget) capped at the smallest context.
    max_new_tokens: one budget for all, or a list of one per prompt (checked by the caller)."""
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, list)) or \
            (isinstance(max_new_tokens, int) and max_new_tokens < 1):
        fail("max_new_tokens", "an int >= 1", max_new_tokens)
    ctx = min(int(m.config.max_position_embeddings) for m in models)
    name = "input_ids" if len(prompts) == 1 else "input_ids[{}]"
    totals = []
    for b, (p, max_new_tokens) in enumerate(zip(prompts, budgets)):
        plen = p.numel()
        if plen >= ctx:
            fail(name.format(b), f"a prompt shorter than the context ({ctx} positions, one left to generate)",
                 f"{plen} tokens")
        check_token_ids(name.format(b), p, models)
        if plen + max_new_tokens > ctx:  # generation stops at the context: say so, never silently
            warnings.warn(f"{name.format(b)}: a {plen}-token prompt leaves room for {ctx - plen} of the "
                          f"max_new_tokens={max_new_tokens} in the context of {ctx} positions", stacklevel=3)
        totals.append(min(plen + max_new_tokens, ctx))
    return totals


def check_token_ids(name: str, prompt: torch.Tensor, models: Sequence) -> None:
    """Every id of `prompt` (non-empty) embeddable by every model. An id that
    one model of the pair embeds and the other cannot names the pair, not the
    prompt (see raise_pair_mismatch)."""
    vocabs = [int(m.config.vocab_size) for m in models]
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo >= 0 and min(vocabs) <= hi < max(vocabs):
        raise_pair_mismatch(models, hi)
    if lo < 0 or hi >= min(vocabs):
        fail(name, f"token ids in [0, {min(vocabs)})", f"ids in [{lo}, {hi}]")


def raise_pair_mismatch(models: Sequence, token_id: int) -> None:
    """A prompt id that one model of the pair embeds and the other cannot: the
    prompt came from the larger model's tokenizer, so the pair is at fault."""
    who = {"dllm": "dLLM", "ar": "verifier"}
    fits = [m for m in models if token_id < int(m.config.vocab_size)]
    short = [m for m in models if token_id >= int(m.config.vocab_size)]
    raise ValueError(
        f"dllm / verifier: the prompt's token id {token_id} is in the "
        f"{who.get(getattr(fits[0], 'kind', ''), 'first model')}'s vocabulary ({int(fits[0].config.vocab_size)}) "
        f"but not in the {who.get(getattr(short[0], 'kind', ''), 'second model')}'s "
        f"({int(short[0].config.vocab_size)}): the two models do not share a tokenizer (APD needs one)")


def stack_prompts(prompts: List[torch.Tensor], width: int, fill: int, device) -> torch.Tensor:
    """[B, width] int64 on the device: prompt b in row b from column 0, then `fill`."""
    out = torch.full((len(prompts), width), fill, dtype=torch.int64)
    for b, p in enumerate(prompts):
        out[b, : p.numel()] = p
    return out.to(device)


def resolve_eos(model, eos_token_ids) -> List[int]:
    """eos_token_ids: None (the checkpoint's), an int, or an iterable of ints."""
    if eos_token_ids is None:
        return [int(e) for e in (getattr(model.config, "eos_token_ids", None) or [])]
    if isinstance(eos_token_ids, int):
        return [eos_token_ids]
    if isinstance(eos_token_ids, torch.Tensor):
        return [int(e) for e in eos_token_ids.flatten().tolist()]
    try:
        return [int(e) for e in eos_token_ids]
    except TypeError:
        raise TypeError(f"eos_token_ids: expected None, an int or a list of ints, got "
                        f"{type(eos_token_ids).__name__}") from None


def sampling_args(temperature, top_p, top_k) -> None:
    """The sampling knobs of the baselines, checked like APDConfig's."""
    APDConfig(temperature=temperature, top_p=top_p, top_k=top_k)


def check_pair(dllm, verifier):
    """The pair checks at load: kinds, devices, check_compatible's config checks,
    and for two folders with tokenizers the full pair report (apd_ext.pairs,
    cached per folder pair). Returns the banned id range (start, end) or None."""
    check_kind("dllm", dllm, "dllm")
    check_kind("verifier", verifier, "ar")
    from apd_ext.pairs import banned_for_models  # tokenizer-level checks: only when a pair is given

    check_compatible(dllm, verifier)
    dd, dv = model_device(dllm), model_device(verifier)
    if dd != dv:
        raise ValueError(f"verifier: expected a model on {dd} (the dLLM's device), got one on {dv}")
    return banned_for_models(dllm, verifier)
