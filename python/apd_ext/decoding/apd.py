"""Batched APD (DESIGN.md §6) and its left-to-right baseline, which shares
the same window, cache and noise semantics: thin loops over the Engine
(decoding/engine.py). The step itself lives in the Engine's rooms (scheduler,
runner, sampler, output path; docs/ARCHITECTURE.md), with its host-side state
and its one host synchronisation per step.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from apd_ext.config import APDConfig
from apd_ext.decoding.engine import Engine
from apd_ext.decoding.inputs import (
    check_kind,
    check_pair,
    check_prompt,
    model_device,
    normalize_prompts,
    resolve_eos,
    sampling_args,
    seed_tensor,
)
from apd_ext.decoding.results import APDOutput, Callback, finish_output

# text_callback(step, text_deltas): text_deltas[b] is the text sequence b
# committed in that step through the Engine's output path (incremental
# detokenizer: complete characters only; "" when nothing completed).
TextCallback = Callable[[int, List[str]], None]


def _graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def _run(dllm, verifier, input_ids, cfg: APDConfig, *, K: Optional[int], eos_token_ids,
         callback: Optional[Callback], n_accept_override: Optional[int],
         cuda_graphs: bool = False, stop_after_steps: Optional[int] = None,
         attention_mask=None, seeds=None, trace: Optional[list] = None,
         max_new_tokens_per_row=None, stop_strings=None, tokenizer=None,
         text_callback: Optional[TextCallback] = None) -> APDOutput:
    """One static batch through the Engine: every prompt is queued at once
    (max_batch = B, max_len = the longest prompt + budget), then the loop steps
    until all have finished. APD (verifier given, K None) and leftright
    (verifier None, K tokens per step) draw the draft with the same (seed,
    step, position) noise, so APD with M=1 equals leftright with K=1. The
    Engine compacts finished rows away (see decoding/engine.py).
    trace (tests only): a list that gets, per step, one tuple (batch index,
    left, right, n_accept) per live sequence."""
    device = model_device(dllm)
    prompts = normalize_prompts(input_ids, attention_mask)
    models = [dllm] if verifier is None else [dllm, verifier]
    B = len(prompts)
    budgets = _row_budgets(cfg.max_new_tokens, B, max_new_tokens_per_row)
    totals = check_prompt(prompts, models, cfg.max_new_tokens if max_new_tokens_per_row is None else budgets)
    eos = resolve_eos(dllm, eos_token_ids)
    seed_bits = seed_tensor(cfg.seed, B, torch.device("cpu"), seeds).tolist()  # int64 bit patterns
    if cuda_graphs and not _graphs_supported(device):
        raise ValueError(f"cuda_graphs: expected models on a CUDA device, got {device}")
    gen_max = max(tot - p.numel() for tot, p in zip(totals, prompts))
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings: need tokenizer=... (stop strings are matched on the decoded text)")
    if text_callback is not None and tokenizer is None:
        raise ValueError("text_callback: need tokenizer=... (the text deltas come from the Engine's detokenizer)")
    if text_callback is not None and not callable(text_callback):
        raise TypeError(f"text_callback: expected a callable (step, text_deltas), got {type(text_callback).__name__}")
    engine = Engine(dllm, verifier, cfg, max_batch=B, max_len=max(totals), K=K, cuda_graphs=cuda_graphs,
                    tokenizer=tokenizer if stop_strings or text_callback is not None else None,
                    _verifier_rows=None if verifier is None else min(cfg.M, gen_max), _graphs_checked=True)
    engine._n_accept_override = n_accept_override
    engine._trace = trace
    for b, p in enumerate(prompts):
        seed = seed_bits[b] + 2**64 if seed_bits[b] < 0 else seed_bits[b]
        engine.add_request(p, dict(seed=seed, stop_token_ids=eos, max_new_tokens=budgets[b],
                                   stop=stop_strings or None), request_id=b)

    accepted = [[] for _ in range(B)]
    generated = [[] for _ in range(B)]
    engine.timer.start()
    while engine.has_unfinished():
        outs = engine.step()
        if stop_after_steps is not None and engine.stats.steps >= stop_after_steps:  # benchmarking only
            engine.finish_all()
        per_step = [[] for _ in range(B)] if callback is not None else None
        texts = [""] * B if text_callback is not None else None
        for o in outs:
            if o.finish_reason == "error":  # the Engine contains it per request; a batch call has no other channel
                raise RuntimeError(f"sequence {o.request_id}: {o.error}")
            accepted[o.request_id].append(len(o.new_tokens))
            generated[o.request_id] += o.new_tokens
            if per_step is not None:
                per_step[o.request_id] = o.new_tokens
            if texts is not None:
                texts[o.request_id] = o.text
        if callback is not None:
            callback(engine.stats.steps, per_step)
        if text_callback is not None:
            text_callback(engine.stats.steps, texts)
    seconds = engine.timer.stop()

    width = max(p.numel() + len(g) for p, g in zip(prompts, generated))
    rows = torch.zeros((B, width), dtype=torch.int64)
    for b, (p, g) in enumerate(zip(prompts, generated)):
        rows[b, : p.numel()] = p
        rows[b, p.numel() : p.numel() + len(g)] = torch.tensor(g, dtype=torch.int64)
    out = finish_output(prompts, rows.to(device), [len(g) for g in generated], max(budgets),
                        getattr(dllm.config, "pad_token_id", None), accepted, engine.stats)
    engine.timer.fill(out.stats, seconds)
    return out


def _row_budgets(default: int, batch: int, per_row) -> list:
    """[B] max_new_tokens: `default` each, or per_row (B ints >= 1)."""
    if per_row is None:
        return [default] * batch
    if isinstance(per_row, torch.Tensor):
        per_row = per_row.tolist()
    try:
        vals = list(per_row)
    except TypeError:
        raise TypeError(f"max_new_tokens_per_row: expected None or a list of {batch} ints, "
                        f"got {type(per_row).__name__}") from None
    if len(vals) != batch:
        raise ValueError(f"max_new_tokens_per_row: expected {batch} budgets (one per prompt), got {len(vals)}")
    for i, v in enumerate(vals):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"max_new_tokens_per_row[{i}]: expected an int >= 1, got {v!r}")
    return vals


def generate(dllm, verifier, input_ids, config: Optional[APDConfig] = None, *,
             eos_token_ids=None, callback: Optional[Callback] = None, cuda_graphs: bool = False,
             attention_mask=None, seeds=None, max_new_tokens_per_row=None, stop_strings=None, tokenizer=None,
             text_callback: Optional[TextCallback] = None, _n_accept_override: Optional[int] = None,
             _stop_after_steps: Optional[int] = None, _trace: Optional[list] = None, **overrides) -> APDOutput:
    """Adaptive Parallel Decoding (DESIGN.md §6).

    dllm: a diffusion model (kind 'dllm') and verifier: an AR model (kind 'ar'),
    both from apd_ext.load_model, same tokenizer, same device.
    input_ids: a list of B 1-D prompts (ragged), a LongTensor [B, L] of B
    full prompts, or [B, L] with attention_mask [B, L] (0/1, left or right
    padding: each row one run of ones touching an end).
    seeds: None (every sequence uses config.seed) or B uint64 seeds. Each
    sequence's tokens are those it gets alone with its seed (batch invariance).
    max_new_tokens_per_row: None (every sequence gets config.max_new_tokens) or
    B ints >= 1, each sequence's own budget: its tokens are those it gets alone
    with that max_new_tokens (the budget also clips its windows, so a longer
    budget's output cut short need not be the same).
    config: APDConfig (default APDConfig()); keyword overrides replace fields.
    eos_token_ids: default the dLLM checkpoint's. callback(step, tokens_accepted):
    tokens_accepted[b] is [] for sequences already finished.
    cuda_graphs: replay the verifier's M-row forward and the dLLM's windows
    (power-of-two buckets) as CUDA graphs, captured before the timed loop.
    Same tokens as eager; CUDA only; off by default. Batched (B > 1): the
    verifier's graphs cover every batch size (buckets), the dLLM runs eagerly.
    stop_strings (with tokenizer, a transformers tokenizer of the pair): a
    sequence ends at the step whose text contains one (the Engine's output
    path); its ids are those up to the end of that step (the stop string's
    tokens included, maybe a few after it: the caller cuts the text).
    text_callback(step, text_deltas) (with tokenizer): text_deltas[b] is the
    text sequence b committed in that step, from the same incremental
    detokenizer as the server's streams: complete characters only (a CJK
    character or emoji split across steps comes once it is whole), special
    ids dropped, cut before a stop string; "" when nothing completed. The
    deltas of a sequence joined equal tokenizer.decode(its ids before EOS,
    skip_special_tokens=True) (cut before a stop string). callback and
    text_callback may be given together; both are called after each step.
    _n_accept_override / _stop_after_steps: benchmarking hooks (a fixed
    acceptance schedule; stop after that many steps), not part of the API.
    _trace: tests only, a list that gets per step [(b, left, right, n_accept)]
    for the live sequences.
    """
    cfg = config if config is not None else APDConfig()
    if not isinstance(cfg, APDConfig):
        raise TypeError(f"config: expected an APDConfig or None, got {type(cfg).__name__}")
    if overrides:
        cfg = cfg.replace(**overrides)
    check_pair(dllm, verifier)
    return _run(dllm, verifier, input_ids, cfg, K=None, eos_token_ids=eos_token_ids,
                callback=callback, n_accept_override=_n_accept_override, cuda_graphs=cuda_graphs,
                stop_after_steps=_stop_after_steps, attention_mask=attention_mask, seeds=seeds,
                trace=_trace, max_new_tokens_per_row=max_new_tokens_per_row, stop_strings=stop_strings,
                tokenizer=tokenizer, text_callback=text_callback)


def generate_leftright(dllm, input_ids, K: int = 1, W: Optional[int] = None, M: Optional[int] = None, *,
                       temperature: float = 0.2, top_p: float = 0.95, top_k: int = 0, seed: int = 0,
                       max_new_tokens: int = 256, eos_token_ids=None,
                       callback: Optional[Callback] = None, compat: Optional[str] = None,
                       cuda_graphs: bool = False, attention_mask=None, seeds=None, stop_strings=None,
                       tokenizer=None, text_callback: Optional[TextCallback] = None,
                       _n_accept_override: Optional[int] = None,
                       _stop_after_steps: Optional[int] = None) -> APDOutput:
    """Left-to-right dLLM decoding: K tokens per step from the dLLM marginals,
    no verifier. W and M as in APD (M None: the whole masked tail is in the
    window). The first EOS ends the sequence. Sampling defaults are
    APDConfig's (temperature 0.2, top_p 0.95); batching (input_ids,
    attention_mask, seeds), cuda_graphs, stop_strings / tokenizer and
    text_callback as in generate."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K: expected an int >= 1, got {K!r}")
    check_kind("dllm", dllm, "dllm")
    sampling_args(temperature, top_p, top_k)
    cfg = APDConfig(R=1.0, W=W, M=M if M is not None else max_new_tokens, temperature=temperature,
                    top_p=top_p, top_k=top_k, compat=compat, max_new_tokens=max_new_tokens, seed=seed)
    return _run(dllm, None, input_ids, cfg, K=K, eos_token_ids=eos_token_ids, callback=callback,
                n_accept_override=_n_accept_override, cuda_graphs=cuda_graphs,
                stop_after_steps=_stop_after_steps, attention_mask=attention_mask, seeds=seeds,
                stop_strings=stop_strings, tokenizer=tokenizer, text_callback=text_callback)
