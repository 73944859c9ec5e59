"""Baselines on the same runtime (DESIGN.md §6): the dLLM's own diffusion
samplers over the whole masked tail, and plain autoregressive decoding."""
from __future__ import annotations

from typing import Optional

import torch

from apd_ext import ops
from apd_ext._validate import check_choice, fail
from apd_ext.decoding.inputs import (
    check_kind,
    check_prompt,
    model_device,
    normalize_prompts,
    resolve_eos,
    sampling_args,
    seed_tensor,
    stack_prompts,
)
from apd_ext.decoding.results import APDOutput, Callback, finish_output, first_eos_count
from apd_ext.decoding.stats import GenerationStats, PhaseTimer
from apd_ext.models.packing import Packing

DIFFUSION_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [N, V] -> probabilities [N, V] of the filtered distribution of
    DESIGN §4 (top-k, then top-p over the sorted order), renormalised. As in
    Dream's samplers the filter also applies at temperature 0 (on the raw
    logits): it decides the confidences, not the drawn argmax."""
    z = logits.float()
    if temperature > 0:
        z = z / temperature
    p = torch.softmax(z, dim=-1)
    sp, order = torch.sort(p, dim=-1, descending=True, stable=True)
    V = z.shape[-1]
    k = top_k if 0 < top_k < V else V
    keep = torch.zeros_like(sp, dtype=torch.bool)
    keep[:, :k] = True
    if top_p < 1.0:
        head = sp[:, :k]
        csum = torch.cumsum(head, dim=-1)
        # Keep the shortest prefix whose mass reaches top_p of the top-k mass.
        before = csum - head
        keep[:, :k] = before < top_p * csum[:, -1:]
    mask = torch.zeros_like(keep).scatter(1, order, keep)
    p = torch.where(mask, p, torch.zeros_like(p))
    return p / p.sum(dim=-1, keepdim=True)


def generate_diffusion(dllm, input_ids, steps: int, alg: str = "entropy", *, temperature: float = 0.2,
                       top_p: float = 0.95, top_k: int = 0, seed: int = 0, max_new_tokens: int = 256,
                       eos_token_ids=None, callback: Optional[Callback] = None,
                       eps: float = 1e-3, _trace: Optional[list] = None) -> APDOutput:
    """Dream-style masked diffusion over the whole tail [P, P + max_new_tokens):
    `steps` full forwards; each unmasks a share of the remaining masks
    (timesteps 1 -> eps, linear), chosen at random ('origin') or by confidence:
    the drawn token's probability ('maskgit_plus'), top-1 minus top-2
    probability ('topk_margin') or negative entropy ('entropy'). Tokens are
    drawn with the shared Gumbel noise (seed, step, position). The output
    keeps tokens up to and including the first EOS. Sampling defaults are
    APDConfig's (temperature 0.2, top_p 0.95). _trace (tests only): a list
    that gets, per step, the sorted absolute positions unmasked in it."""
    check_kind("dllm", dllm, "dllm")
    check_choice("alg", alg, DIFFUSION_ALGS)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    sampling_args(temperature, top_p, top_k)
    device = model_device(dllm)
    plist = normalize_prompts(input_ids)
    if len(plist) != 1:
        # The diffusion baseline decodes one prompt at a time (batching is APD's, leftright's and AR's).
        fail("input_ids", "one prompt (generate_diffusion is not batched)", f"{len(plist)} prompts")
    total_len = check_prompt(plist, [dllm], max_new_tokens)[0]
    prompts = plist[0][None]  # [1, P]
    eos = resolve_eos(dllm, eos_token_ids)
    B, plen = prompts.shape
    gen_len = total_len - plen
    mask_id = int(dllm.config.mask_token_id)

    tokens = torch.full((B, total_len), mask_id, dtype=torch.int64, device=device)  # [B, L]
    tokens[:, :plen] = prompts.to(device)
    seeds = seed_tensor(seed, B, device)
    cache = dllm.new_cache(B, total_len)
    rng = torch.Generator(device="cpu").manual_seed(int(seed) % 2**63)
    timesteps = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)
    zero = torch.zeros(B, dtype=torch.int64, device=device)
    pos = torch.full((B,), plen, dtype=torch.int64, device=device)
    rows_d = torch.full((B,), gen_len, dtype=torch.int64, device=device)
    stats = GenerationStats()
    timer = PhaseTimer(device)
    accepted = [[]]
    timer.start()
    for i in range(steps):
        masked = (tokens[0, plen:] == mask_id).nonzero().flatten()  # [nm] offsets in the tail
        nm = masked.numel()
        if nm == 0:
            break
        cache.crop_(zero)
        with timer("dllm"):
            logits = dllm.forward(tokens, cache, zero, torch.full_like(zero, total_len),
                                  logit_rows=(torch.full_like(zero, plen - 1), gen_len))  # [B, gen, V]
        stats.dllm_forwards += 1
        with timer("sampling"):
            draft = ops.sample_draft(logits, pos, rows_d, seeds, torch.full_like(zero, i),
                                     temperature=temperature, top_k=top_k, top_p=top_p)[0]  # [gen]
            if (draft[masked] < 0).any():
                j = int(masked[(draft[masked] < 0).nonzero()[0]])
                raise RuntimeError(f"step {i}: the dLLM logits row for position {plen + j} is not finite "
                                   "(draft id -1)")
            s_ratio = float(timesteps[i + 1] / timesteps[i])
            last = i == steps - 1
            if alg == "origin":
                p_transfer = 1.0 if last else 1.0 - s_ratio
                pick = torch.rand(nm, generator=rng) < p_transfer
                chosen = masked[pick.to(device)]
            else:
                probs = _filtered_probs(logits[0, masked], temperature, top_k, top_p)  # [nm, V]
                if alg == "maskgit_plus":
                    conf = probs.gather(1, draft[masked][:, None]).squeeze(1)
                elif alg == "topk_margin":
                    top2 = probs.topk(2, dim=-1).values
                    conf = top2[:, 0] - top2[:, 1]
                else:  # entropy: negative entropy, higher = more certain
                    conf = (probs * torch.log(probs.clamp_min(1e-10))).sum(-1)
                k = nm if last else int(nm * (1.0 - s_ratio))
                chosen = masked[torch.topk(conf, k).indices] if k > 0 else masked[:0]
            tokens[0, plen + chosen] = draft[chosen]
            if last and chosen.numel() != nm:
                # The loop invariant: the last step unmasks every position still
                # masked, so the output holds no [MASK] the caller did not ask for.
                raise RuntimeError(f"step {i}: the last diffusion step unmasked {chosen.numel()} of the "
                                   f"{nm} masked positions (from position {plen + int(masked[0])})")
        if _trace is not None:
            _trace.append(sorted((plen + chosen).tolist()))
        stats.steps += 1
        accepted[0].append(int(chosen.numel()))
        if callback is not None:
            callback(i + 1, [draft[chosen].tolist()])
    seconds = timer.stop()
    tail = tokens[0, plen:].tolist()
    # Tokens still masked (fewer steps than needed) count as not generated.
    if mask_id in tail:
        tail = tail[: tail.index(mask_id)]
    generated = first_eos_count(tail, eos)
    out = finish_output(plist, tokens, [generated], max_new_tokens,
                        getattr(dllm.config, "pad_token_id", None), accepted, stats)
    timer.fill(out.stats, seconds)
    return out


def generate_ar(model, input_ids, *, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 0,
                seed: int = 0, max_new_tokens: int = 256, eos_token_ids=None,
                callback: Optional[Callback] = None, attention_mask=None, seeds=None) -> APDOutput:
    """Plain autoregressive decoding with a Qwen2 model (kind 'ar'): greedy at
    temperature 0, otherwise Gumbel-max sampling with the shared noise
    (seed, step, position); defaults are APDConfig's (0.2, top_p 0.95). Stops
    after the first EOS or at the budget. Batched as generate (ragged prompts,
    attention_mask, per-sequence seeds); finished sequences leave the batch."""
    check_kind("model", model, "ar")
    sampling_args(temperature, top_p, top_k)
    device = model_device(model)
    prompts = normalize_prompts(input_ids, attention_mask)
    totals = check_prompt(prompts, [model], max_new_tokens)
    eos = resolve_eos(model, eos_token_ids)
    B = len(prompts)
    seeds_d = seed_tensor(seed, B, device, seeds)  # [B]
    L = max(totals)
    plens = torch.tensor([p.numel() for p in prompts], dtype=torch.int64)
    tokens = stack_prompts(prompts, L, 0, device)  # [n, L] live rows
    out_tokens = tokens.clone()  # [B, L] in batch order
    base = model.new_cache(B, L)  # capacity B; the live rows first
    cache = base
    live = torch.arange(B)
    t = plens.clone()  # [n] next position to sample
    total = torch.tensor(totals, dtype=torch.int64)
    generated = [0] * B
    stats = GenerationStats()
    timer = PhaseTimer(device)
    accepted = [[] for _ in range(B)]
    timer.start()
    t_d = t.to(device)
    ones = torch.ones(B, dtype=torch.int64, device=device)
    with timer("verifier"):
        logits = model.forward(tokens[:, : int(plens.max())], cache, torch.zeros_like(ones), t_d,
                               logit_rows=(t_d - 1, 1),  # [B, 1, V]
                               packing=Packing.build(plens, int(plens.max()), device))  # ragged prompts, packed
    stats.verifier_forwards += 1
    while True:
        n = live.numel()
        with timer("sampling"):
            tok = ops.sample_draft(logits, t_d, ones[:n], seeds_d, torch.full_like(t_d, stats.steps),
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   check_lengths=False)  # [n, 1]
        tokens.scatter_(1, t_d[:, None], tok)
        toks = tok[:, 0].tolist()  # the one host synchronisation per step
        stats.steps += 1
        per_step = [[] for _ in range(B)]
        done = torch.zeros(n, dtype=torch.bool)
        for i, v in enumerate(toks):
            b = int(live[i])
            if v < 0:
                raise RuntimeError(f"step {stats.steps - 1}: the model's logits row for position {int(t[i])} "
                                   "is not finite (sampled id -1)")
            accepted[b].append(1)
            per_step[b] = [v]
            done[i] = v in eos or int(t[i]) + 1 >= int(total[i])
        t += 1
        if callback is not None:
            callback(stats.steps, per_step)
        if bool(done.any()):
            # Compaction, as in the APD loop: finished rows leave every buffer.
            fin, stay = done.nonzero().flatten(), (~done).nonzero().flatten()
            for i in fin.tolist():
                generated[int(live[i])] = int(t[i] - plens[i])
            out_tokens[live[fin].to(device)] = tokens[fin.to(device)]
            live, t, total, plens = live[stay], t[stay], total[stay], plens[stay]
            if not live.numel():
                break
            stay_d = stay.to(device)
            tokens, seeds_d, tok = tokens[stay_d], seeds_d[stay_d], tok[stay_d]
            base.compact_(stay_d)
            cache = base.view(0, live.numel())
        t_d = t.to(device)
        with timer("verifier"):
            logits = model.forward(tok, cache, t_d - 1, ones[: live.numel()], logit_rows=None)  # [n, 1, V]
        stats.verifier_forwards += 1
    seconds = timer.stop()
    out = finish_output(prompts, out_tokens, generated, max_new_tokens,
                        getattr(model.config, "pad_token_id", None), accepted, stats)
    timer.fill(out.stats, seconds)
    return out


__all__ = ["generate_diffusion", "generate_ar", "DIFFUSION_ALGS"]
