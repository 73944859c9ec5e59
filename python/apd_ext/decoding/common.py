"""Pieces shared by the APD loop and its baselines: the output type, the
per-phase timer, prompt normalisation and the checks every entry point runs
before any forward (DESIGN.md §6, §7)."""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from apd_ext._validate import fail

# callback(step, tokens_accepted): step is the 1-based step just finished,
# tokens_accepted[b] the list of token ids sequence b committed in that step.
Callback = Callable[[int, List[List[int]]], None]


@dataclass
class GenerationStats:
    """Counters and timings of one generation. Seconds are wall time from the
    first forward to the last commit, device synchronised; the per-phase
    seconds come from CUDA events on CUDA and from the host clock on the CPU."""

    steps: int = 0
    dllm_forwards: int = 0
    verifier_forwards: int = 0  # for generate_ar: the AR model's forwards
    generated_tokens: int = 0  # up to and including the first EOS, summed over B
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    dllm_seconds: float = 0.0
    verifier_seconds: float = 0.0
    sampling_seconds: float = 0.0
    batch_size: int = 1
    sequence_steps: int = 0  # steps summed over the sequences (a batch step counts each live one)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class APDOutput:
    """sequences: [B, max_b P_b + max_new] int64, row b = prompt b (from column
    0) + its generation, padded with the pad id after the sequence's end; num_generated: [B] int64 (the first EOS
    included); accepted_per_step[b]: tokens committed at each step."""

    sequences: torch.Tensor  # [B, P + max_new_tokens] int64
    num_generated: torch.Tensor  # [B] int64
    accepted_per_step: List[List[int]]
    stats: GenerationStats = field(default_factory=GenerationStats)
    prompt_lengths: List[int] = field(default_factory=list)

    def generated(self, b: int = 0) -> torch.Tensor:
        """The generated ids of sequence b (1-D, EOS included)."""
        start = self.prompt_lengths[b]
        return self.sequences[b, start : start + int(self.num_generated[b])]

    def sequence_stats(self, b: int) -> dict:
        """Per-sequence counters: steps it was live, tokens generated, tokens per step."""
        steps = len(self.accepted_per_step[b])
        gen = int(self.num_generated[b])
        return dict(steps=steps, generated_tokens=gen, tokens_per_step=gen / steps if steps else 0.0)


class PhaseTimer:
    """Accumulates seconds per phase ('dllm', 'verifier', 'sampling').

    On CUDA it records event pairs and reads them once at the end, so that
    timing adds no host synchronisation to the loop."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals = {"dllm": 0.0, "verifier": 0.0, "sampling": 0.0}
        self._events = []
        self._t0 = 0.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        self.sync()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Synchronise, fold the CUDA events into the totals, return wall seconds."""
        self.sync()
        seconds = time.perf_counter() - self._t0
        for phase, begin, end in self._events:
            self.totals[phase] += begin.elapsed_time(end) / 1e3
        self._events.clear()
        return seconds

    @contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
            self._events.append((phase, begin, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[phase] += time.perf_counter() - t0

    def fill(self, stats: GenerationStats, seconds: float) -> None:
        stats.seconds = seconds
        stats.dllm_seconds = self.totals["dllm"]
        stats.verifier_seconds = self.totals["verifier"]
        stats.sampling_seconds = self.totals["sampling"]
        stats.tokens_per_second = stats.generated_tokens / seconds if seconds > 0 else 0.0


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


def cache_prefix(cache, n: int):
    """A KVCache VIEW of sequences 0 .. n-1 of `cache` (same storage, lengths a
    view too): the live rows of a compacted batch. CUDA graphs captured on a
    view stay valid, since compaction moves data but never reallocates."""
    from apd_ext.models.cache import KVCache

    view = KVCache.__new__(KVCache)
    view._k, view._v = cache._k[:, :n], cache._v[:, :n]  # [layers, n, max_len + 1, Hkv, D]
    view.lengths = cache.lengths[:n]  # [n]
    view.batch_size, view.max_len, view.num_layers = n, cache.max_len, cache.num_layers
    return view


def compact_cache_(cache, keep: torch.Tensor, upto: Optional[int] = None) -> None:
    """Batch compaction in place: sequences `keep` ([n] int64, ascending, on
    the cache's device) move to rows 0 .. n-1 (one gather of K and V).
    upto: a host bound on every kept sequence's length (its prompt + budget):
    only positions [0, upto) move, since nothing past a sequence's length is
    ever read before it is written. The Engine's caches are max_len wide
    (4096 by default) and compaction runs whenever a request leaves, so moving
    the whole width would cost in proportion to max_len, not to what is used."""
    n = keep.numel()
    w = cache._k.shape[2] if upto is None else min(int(upto), cache._k.shape[2])
    cache._k[:, :n, :w] = cache._k[:, :, :w].index_select(1, keep)
    cache._v[:, :n, :w] = cache._v[:, :, :w].index_select(1, keep)
    cache.lengths[:n] = cache.lengths.index_select(0, keep)


def batch_buckets(batch: int) -> List[int]:
    """Batch sizes with a captured graph: powers of two below `batch`, and `batch`."""
    out = [1]
    while out[-1] * 2 < batch:
        out.append(out[-1] * 2)
    return sorted(set(out + [batch]))


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
    from apd_ext.config import APDConfig

    APDConfig(temperature=temperature, top_p=top_p, top_k=top_k)


def first_eos_count(ids: Iterable[int], eos: Sequence[int]) -> int:
    """Number of ids up to and including the first EOS (all of them if none)."""
    ids = list(ids)
    for i, v in enumerate(ids):
        if v in eos:
            return i + 1
    return len(ids)


def finish_output(prompts: List[torch.Tensor], tokens: torch.Tensor, generated: Sequence[int],
                  max_new_tokens: int, pad_id: Optional[int], accepted: List[List[int]],
                  stats: GenerationStats) -> APDOutput:
    """tokens: [B, >= P_b + generated_b] rows in batch order (prompt b from
    column 0); keeps prompt + generated of each row, pads the rest."""
    B = len(prompts)
    plens = [p.numel() for p in prompts]
    pad = pad_id if pad_id is not None else 0
    seq = torch.full((B, max(plens) + max_new_tokens), pad, dtype=torch.int64, device=tokens.device)
    for b in range(B):
        n = plens[b] + int(generated[b])
        seq[b, :n] = tokens[b, :n]
    stats.generated_tokens = int(sum(generated))
    stats.batch_size = B
    stats.sequence_steps = sum(len(a) for a in accepted)
    return APDOutput(
        sequences=seq,
        num_generated=torch.tensor([int(g) for g in generated], dtype=torch.int64),
        accepted_per_step=accepted,
        stats=stats,
        prompt_lengths=plens,
    )


def check_progress(step, t_host: torch.Tensor, n_accept_host: torch.Tensor, live=None) -> None:
    """The decode loop's progress invariant: a live sequence accepts >= 1 token
    per step (a_0 = 1, DESIGN §4), so every loop ends. step: an int, or the
    live sequences' own step counters (host [n]); t_host, n_accept_host:
    host [n] int64 of the live sequences; live: their batch indices or request
    ids (default 0 .. n-1). A row that accepted 0 tokens would spin forever at the same t:
    raise instead, naming the step, the sequence and the position."""
    stuck = (n_accept_host < 1).nonzero().flatten()
    if stuck.numel():
        i = int(stuck[0])
        b = live[i] if live is not None else i
        b = int(b) if isinstance(b, torch.Tensor) else b
        if isinstance(step, torch.Tensor):  # per-sequence step counters (the Engine)
            step = int(step[i])
        raise RuntimeError(
            f"step {step}: sequence {b} accepted {int(n_accept_host[i])} tokens at position "
            f"{int(t_host[i])} (the first drafted token is always accepted, so a live sequence "
            "must advance every step); the acceptance kernel or loop is broken")
