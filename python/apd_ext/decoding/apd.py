"""The APD decoding loop (DESIGN.md §6) and its left-to-right baseline, which
shares the same window, cache and noise semantics.

Per live sequence the loop state is a host [n] tensor (t, n_prev, total);
left and right are derived from it each step. Finished sequences leave the
batch (compaction, see _run). Shapes of the forwards depend on t,
so a host copy of the state drives them; the one host synchronisation per
step is the read of n_accept (it brings the drafted ids along, for streaming
and for the bad-row check, in the same copy).
"""
from __future__ import annotations

from typing import Optional

import torch

from apd_ext import ops
from apd_ext.config import APDConfig
from apd_ext.decoding.common import (
    APDOutput,
    Callback,
    GenerationStats,
    PhaseTimer,
    check_kind,
    check_progress,
    check_prompt,
    model_device,
    normalize_prompts,
    resolve_eos,
    sampling_args,
    seed_tensor,
    finish_output,
    batch_buckets,
    cache_prefix,
    compact_cache_,
    stack_prompts,
)


def _check_pair(dllm, verifier) -> None:
    check_kind("dllm", dllm, "dllm")
    check_kind("verifier", verifier, "ar")
    from apd_ext import check_compatible

    check_compatible(dllm, verifier)
    dd, dv = model_device(dllm), model_device(verifier)
    if dd != dv:
        raise ValueError(f"verifier: expected a model on {dd} (the dLLM's device), got one on {dv}")


class _Window:
    """The dLLM half of a step: window bounds, the forward over [left, right)
    with [0, left) from the cache, and the rows t-1 .. t+rows-2 of the shifted
    logits (Dream predicts position i from the hidden state at i - 1)."""

    def __init__(self, dllm, batch: int, total_len: int, W: Optional[int], M: Optional[int],
                 graphs: bool = False):
        self.dllm = dllm
        self.W = W
        self.M = M if M is not None else total_len
        self.total_len = total_len
        self.base = dllm.new_cache(batch, total_len)  # capacity B; live rows first
        self.cache = self.base  # view of the live rows
        self.graphed = None
        if graphs and W is not None:
            # After the first step the window is n_prev + W - 1 + M rows at most
            # (n_prev <= M) and about W + M at least: capture the power-of-two
            # buckets covering [W + M, 2M + W - 1] now, outside the timed loop.
            # Shorter windows (near the end) are padded into the smallest one;
            # longer ones (the first step, with the prompt) run eagerly. W=None
            # windows grow with the sequence, so they always run eagerly.
            from apd_ext.models.graphs import BucketedGraphs

            lo, hi = min(self.M + W, total_len), min(2 * self.M + W - 1, total_len)
            buckets = [1 << (lo - 1).bit_length()]
            while buckets[-1] < hi:
                buckets.append(buckets[-1] * 2)
            self.graphed = BucketedGraphs(dllm, self.cache, buckets=tuple(buckets))
            zero = torch.zeros(batch, dtype=torch.int64, device=self.cache.device)
            for size in buckets:  # q_len = 0: capture only, nothing valid is written
                self.graphed(torch.zeros(batch, size, dtype=torch.int64, device=zero.device), zero, zero, zero, 1)

    def bounds(self, t: torch.Tensor, n_prev: torch.Tensor, total: torch.Tensor, first: bool):
        """t, n_prev, total (each sequence's length): host [B] int64 -> left, right: host [B] int64."""
        if first or self.W is None:
            left = torch.zeros_like(t)
        else:
            left = (t - n_prev - self.W + 1).clamp_min(0)
        right = torch.minimum(t + self.M, total)
        return left, right

    def forward(self, win: torch.Tensor, rows: int, args: "_StepArgs"):
        """win: [B, Lw] ids of positions left_b .. left_b + Lw - 1 (rows past
        right_b are padding). Returns the dLLM logits [B, rows, V_D] for
        positions t_b .. t_b + rows - 1 (rows past each sequence's own count
        are padding)."""
        self.cache.crop_(args.left)
        if self.graphed is not None:
            return self.graphed(win, args.left, args.window, args.row_start, rows)
        return self.dllm.forward(
            win,  # [B, Lw]
            self.cache,
            args.left,
            args.window,
            logit_rows=(args.row_start, rows),
        )


class _StepArgs:
    """The per-step [B] int64 vectors the forwards and ops read on the device,
    staged in one host buffer (pinned on CUDA) and sent with ONE non-blocking
    copy: no per-vector host->device transfer, no stream synchronisation.
    Reusing the buffer is safe because each step ends with a synchronising
    read (n_accept), after which the previous copy has completed."""

    FIELDS = ("left", "window", "row_start", "pos", "rows", "step", "ver_start")

    def __init__(self, batch: int, device: torch.device):
        self.device = device
        self.host = torch.zeros((len(self.FIELDS), batch), dtype=torch.int64,
                                pin_memory=device.type == "cuda")  # [7, B]

    def send(self, n: int, **values) -> None:
        """values: [n] host vectors (or scalars) for the n live sequences."""
        host = self.host[:, :n]
        for i, name in enumerate(self.FIELDS):
            host[i] = values[name]
        if self.device.type == "cuda":
            dev = host.to(self.device, non_blocking=True)
        else:
            dev = host.clone()
        for i, name in enumerate(self.FIELDS):
            setattr(self, name, dev[i])  # [B] views


def _bad_row(step: int, t: int, draft_host: torch.Tensor, rows: int, who: str = "dLLM") -> None:
    bad = (draft_host[:rows] < 0).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise RuntimeError(
            f"step {step}: the {who} logits row for position {t + i} is not finite (NaN or all -inf), "
            f"so no token could be drafted there (draft id -1); check the model's weights and dtype")


class _Verifier:
    """The verifier half of a step: one causal forward over m <= M rows
    starting at position t-1, on a cache holding [0, t-1). With graphs, one CUDA
    graph of exactly M rows per batch bucket (powers of two up to B, on prefix
    views of one capacity-B cache) replays every step: shorter windows are
    padded with rows, smaller live batches with sequences of q_len 0 (they
    only write the scratch slot of dead rows); their logits are sliced off."""

    def __init__(self, verifier, batch: int, total_len: int, max_rows: int, graphs: bool):
        self.model = verifier
        self.base = verifier.new_cache(batch, total_len)  # capacity B; live rows first
        self.cache = self.base  # view of the live rows
        self.vocab = int(verifier.config.vocab_size)
        self.max_rows = max_rows
        self.graphs = {}
        if graphs:
            for nb in batch_buckets(batch):
                self.graphs[nb] = verifier.graphed(cache_prefix(self.base, nb), max_rows)

    def keep(self, keep_d: torch.Tensor) -> None:
        """Compaction: only sequences keep_d ([n] ascending) stay, as rows 0 .. n-1."""
        compact_cache_(self.base, keep_d)
        self.cache = cache_prefix(self.base, keep_d.numel())

    def forward(self, v_in: torch.Tensor, start: torch.Tensor, rows_d: torch.Tensor, rows: int):
        """v_in: [n, rows] ids, start / rows_d: [n] -> logits [n, rows, V_A]."""
        self.cache.crop_(start)
        if not self.graphs:
            return self.model.forward(v_in, self.cache, start, rows_d, logit_rows=None)
        n = v_in.shape[0]
        nb = next(b for b in sorted(self.graphs) if b >= n)
        v_in = torch.nn.functional.pad(v_in, (0, self.max_rows - rows, 0, nb - n))  # [nb, M]
        if nb > n:
            start = torch.nn.functional.pad(start, (0, nb - n))
            rows_d = torch.nn.functional.pad(rows_d, (0, nb - n))  # q_len 0: padding sequences
        return self.graphs[nb](v_in, start, rows_d)[:n, :rows]  # a view of the graph's output


def _graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def _run(dllm, verifier, input_ids, cfg: APDConfig, *, K: Optional[int], eos_token_ids,
         callback: Optional[Callback], n_accept_override: Optional[int],
         cuda_graphs: bool = False, stop_after_steps: Optional[int] = None,
         attention_mask=None, seeds=None, trace: Optional[list] = None) -> APDOutput:
    """One loop for APD (verifier given, K None) and leftright (verifier None,
    K tokens per step). Both draw the draft with the same (seed, step,
    position) noise, so APD with M=1 equals leftright with K=1.

    Batching: the live sequences are rows 0 .. n-1 of every device buffer and
    cache. Each step pads their windows [left_b, right_b) to one Lw and passes
    ragged q_start / q_len / logit rows; padding rows only ever write the
    caches' scratch slot. A sequence that finishes (EOS or length) leaves the
    batch at once: its tokens go to the output and the caches, ids and seeds
    are COMPACTED in place (one gather of the live rows to the front of the
    capacity-B caches, which keeps the verifier's graphs valid), rather than masked. Masking
    (q_len = 0) would keep its rows in every GEMM of both models until the last
    sequence ends; compaction costs one cache gather per finishing event (at
    most B per generation, none at all when the whole batch ends together).

    trace (tests only): a list that gets, per step, one tuple (batch index,
    left, right, n_accept) per live sequence."""
    device = model_device(dllm)
    prompts = normalize_prompts(input_ids, attention_mask)
    models = [dllm] if verifier is None else [dllm, verifier]
    totals = check_prompt(prompts, models, cfg.max_new_tokens)
    eos = resolve_eos(dllm, eos_token_ids)
    eos_dev = torch.tensor(eos, dtype=torch.int64, device=device) if eos else None
    B = len(prompts)
    seeds_d = seed_tensor(cfg.seed, B, device, seeds)  # [B]
    if cuda_graphs and not _graphs_supported(device):
        raise ValueError(f"cuda_graphs: expected models on a CUDA device, got {device}")
    mask_id = int(dllm.config.mask_token_id)
    L = max(totals)
    plens = torch.tensor([p.numel() for p in prompts], dtype=torch.int64)
    # Width 2L: window gathers and commits index up to left + Lw <= 2L - 1 and
    # t + rows <= L without clamping (no duplicate scatter targets).
    tokens = stack_prompts(prompts, 2 * L, mask_id, device)  # [n, 2L] live rows
    out_tokens = tokens.clone()  # [B, 2L] rows in batch order, filled as sequences finish
    # The dLLM's graphs are bucketed by window length for B = 1 only (window x
    # batch buckets would multiply the captures); the verifier's graphs cover
    # every batch size (see _Verifier).
    window = _Window(dllm, B, L, cfg.W, cfg.M, graphs=cuda_graphs and B == 1)
    args = _StepArgs(B, device)
    # Loop state of the live sequences (host tensors: they size the forwards).
    # Lengths passed to the ops are valid by construction (0 <= rows_b <= M),
    # so the ops' host-side length checks (a device sync on CUDA) are skipped.
    live = torch.arange(B)  # batch index of each live row
    t = plens.clone()  # [n]
    total = torch.tensor(totals, dtype=torch.int64)  # [n]
    n_prev = torch.zeros(B, dtype=torch.int64)  # [n]
    generated = [0] * B

    stats = GenerationStats()
    timer = PhaseTimer(device)
    accepted = [[] for _ in range(B)]
    ver = None
    if verifier is not None:
        ver = _Verifier(verifier, B, L, min(cfg.M, int((total - plens).max())), cuda_graphs)
    timer.start()
    pmax = int(plens.max())
    if ver is not None and pmax > 1:  # the verifier's cache holds [0, t-1) before each step
        with timer("verifier"):
            verifier.forward(
                tokens[:, : pmax - 1], ver.cache,
                torch.zeros(B, dtype=torch.int64, device=device),
                (plens - 1).to(device),  # q_len 0 for one-token prompts
                logit_rows=(torch.zeros(B, dtype=torch.int64, device=device), 1),
            )
        stats.verifier_forwards += 1

    step = 0
    while live.numel():
        n = live.numel()
        left_t, right_t = window.bounds(t, n_prev, total, first=step == 0)
        m_t = right_t - t  # drafted rows per sequence, >= 1
        rows_t = m_t if K is None else m_t.clamp(max=K)
        rows = int(rows_t.max())
        row_start = t - 1 - left_t
        Lw = int(torch.maximum(right_t - left_t, row_start + rows).max())
        args.send(n, left=left_t, window=right_t - left_t, row_start=row_start, pos=t, rows=rows_t,
                  step=step, ver_start=t - 1)
        pos_d, step_d, rows_d = args.pos, args.step, args.rows  # [n] each, on the device
        ar = torch.arange(max(Lw, rows), device=device)

        win = tokens.gather(1, args.left[:, None] + ar[:Lw])  # [n, Lw]
        with timer("dllm"):
            d_logits = window.forward(win, rows, args)  # [n, rows, V_D]
        stats.dllm_forwards += 1
        with timer("sampling"):
            draft = ops.sample_draft(
                d_logits, pos_d, rows_d, seeds_d, step_d, temperature=cfg.temperature,
                top_k=cfg.top_k, top_p=cfg.top_p, compat=cfg.compat,
                check_lengths=False)  # [n, rows], -1 past rows_b

        if ver is not None:
            # Row i of the verifier scores position t+i given x_<t and draft_t .. draft_{t+i-1}.
            # Ids the verifier cannot embed are clamped into [0, V_A): a bad row's
            # -1 (the step raises once n_accept is read), padding rows' -1, and
            # dLLM ids >= V_A (its padding rows: such a draft never matches,
            # DESIGN §4, but the first token of a step is accepted anyway and
            # then feeds the next step).
            v_in = torch.cat([tokens.gather(1, args.ver_start[:, None]), draft[:, : rows - 1]], dim=1)  # [n, rows]
            v_in.clamp_(0, ver.vocab - 1)
            with timer("verifier"):
                a_logits = ver.forward(v_in, args.ver_start, rows_d, rows)  # [n, rows, V_A]
            stats.verifier_forwards += 1
            with timer("sampling"):
                _, n_acc = ops.mixture_accept(
                    d_logits, a_logits, draft, pos_d, rows_d, seeds_d, step_d, R=cfg.R,
                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                    eos_ids=eos_dev, acceptance=cfg.sampling_acceptance, compat=cfg.compat,
                    check_lengths=False)  # [n]
        else:
            with timer("sampling"):
                n_acc = ops.accept_prefix(draft, draft, rows_d, eos_ids=eos_dev, check_lengths=False)  # [n]

        if n_accept_override is not None:  # benchmarking only: a fixed acceptance schedule
            n_acc = torch.minimum(torch.full_like(n_acc, n_accept_override), rows_d)
        # Commit on the device (no host round trip): tokens[b, t_b + j] = draft[b, j] for j < n_acc[b].
        idx = pos_d[:, None] + ar[:rows]  # [n, rows], < L by construction
        keep = ar[:rows] < n_acc[:, None]
        tokens.scatter_(1, idx, torch.where(keep, draft, tokens.gather(1, idx)))
        # The one host synchronisation of the step: n_accept, with the draft alongside.
        host = torch.cat([n_acc, draft.reshape(-1)]).cpu()
        n_h = host[:n]
        d_host = host[n:].view(n, rows)
        check_progress(step, t, n_h, live)
        if trace is not None:  # tests only: per-step window bounds and acceptance
            trace.append([(int(b), int(l), int(r), int(k)) for b, l, r, k in zip(live, left_t, right_t, n_h)])
        per_step = [[] for _ in range(B)] if callback is not None else None
        done = torch.zeros(n, dtype=torch.bool)
        for i in range(n):
            b, r = int(live[i]), int(rows_t[i])
            _bad_row(step, int(t[i]), d_host[i], r)
            k = int(n_h[i])
            new = d_host[i, :k].tolist()
            accepted[b].append(k)
            if per_step is not None:
                per_step[b] = new
            if any(v in eos for v in new) or int(t[i]) + k >= int(total[i]):
                done[i] = True
        stats.steps += 1
        step += 1
        t += n_h
        n_prev = n_h.clone()
        if stop_after_steps is not None and stats.steps >= stop_after_steps:  # benchmarking only
            done[:] = True
        if callback is not None:
            callback(step, per_step)

        if bool(done.any()):
            fin, stay = done.nonzero().flatten(), (~done).nonzero().flatten()
            for i in fin.tolist():
                generated[int(live[i])] = int(t[i] - plens[i])
            out_tokens[live[fin].to(device)] = tokens[fin.to(device)]
            live, t, total, n_prev, plens = live[stay], t[stay], total[stay], n_prev[stay], plens[stay]
            if live.numel():
                stay_d = stay.to(device)
                tokens, seeds_d = tokens[stay_d], seeds_d[stay_d]
                compact_cache_(window.base, stay_d)
                window.cache = cache_prefix(window.base, live.numel())
                if ver is not None:
                    ver.keep(stay_d)

    seconds = timer.stop()
    out = finish_output(prompts, out_tokens, generated, cfg.max_new_tokens,
                        getattr(dllm.config, "pad_token_id", None), accepted, stats)
    timer.fill(out.stats, seconds)
    return out


def generate(dllm, verifier, input_ids, config: Optional[APDConfig] = None, *,
             eos_token_ids=None, callback: Optional[Callback] = None, cuda_graphs: bool = False,
             attention_mask=None, seeds=None,
             _n_accept_override: Optional[int] = None, _stop_after_steps: Optional[int] = None,
             _trace: Optional[list] = None, **overrides) -> APDOutput:
    """Adaptive Parallel Decoding (DESIGN.md §6).

    dllm: a diffusion model (kind 'dllm') and verifier: an AR model (kind 'ar'),
    both from apd_ext.load_model, same tokenizer, same device.
    input_ids: a list of B 1-D prompts (ragged), a LongTensor [B, L] of B
    full prompts, or [B, L] with attention_mask [B, L] (0/1, left or right
    padding: each row one run of ones touching an end).
    seeds: None (every sequence uses config.seed) or B uint64 seeds. Each
    sequence's tokens are those it gets alone with its seed (batch invariance).
    config: APDConfig (default APDConfig()); keyword overrides replace fields.
    eos_token_ids: default the dLLM checkpoint's. callback(step, tokens_accepted):
    tokens_accepted[b] is [] for sequences already finished.
    cuda_graphs: replay the verifier's M-row forward and the dLLM's windows
    (power-of-two buckets) as CUDA graphs, captured before the timed loop.
    Same tokens as eager; CUDA only; off by default. Batched (B > 1): the
    verifier's graphs cover every batch size (buckets), the dLLM runs eagerly.
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
    _check_pair(dllm, verifier)
    return _run(dllm, verifier, input_ids, cfg, K=None, eos_token_ids=eos_token_ids,
                callback=callback, n_accept_override=_n_accept_override, cuda_graphs=cuda_graphs,
                stop_after_steps=_stop_after_steps, attention_mask=attention_mask, seeds=seeds,
                trace=_trace)


def generate_leftright(dllm, input_ids, K: int = 1, W: Optional[int] = None, M: Optional[int] = None, *,
                       temperature: float = 0.2, top_p: float = 0.95, top_k: int = 0, seed: int = 0,
                       max_new_tokens: int = 256, eos_token_ids=None,
                       callback: Optional[Callback] = None, compat: Optional[str] = None,
                       cuda_graphs: bool = False, attention_mask=None, seeds=None,
                       _n_accept_override: Optional[int] = None,
                       _stop_after_steps: Optional[int] = None) -> APDOutput:
    """Left-to-right dLLM decoding: K tokens per step from the dLLM marginals,
    no verifier. W and M as in APD (M None: the whole masked tail is in the
    window). The first EOS ends the sequence. Sampling defaults are
    APDConfig's (temperature 0.2, top_p 0.95); batching (input_ids,
    attention_mask, seeds) and cuda_graphs as in generate."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K: expected an int >= 1, got {K!r}")
    check_kind("dllm", dllm, "dllm")
    sampling_args(temperature, top_p, top_k)
    cfg = APDConfig(R=1.0, W=W, M=M if M is not None else max_new_tokens, temperature=temperature,
                    top_p=top_p, top_k=top_k, compat=compat, max_new_tokens=max_new_tokens, seed=seed)
    return _run(dllm, None, input_ids, cfg, K=K, eos_token_ids=eos_token_ids, callback=callback,
                n_accept_override=_n_accept_override, cuda_graphs=cuda_graphs,
                stop_after_steps=_stop_after_steps, attention_mask=attention_mask, seeds=seeds)
