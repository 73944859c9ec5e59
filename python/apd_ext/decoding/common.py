"""Pieces shared by the APD loop and its baselines: the output type, the
per-phase timer, prompt normalisation and the checks every entry point runs
before any forward (DESIGN.md §6, §7)."""
from __future__ import annotations

import time
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

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class APDOutput:
    """sequences: [B, P + max_new] int64, prompt + generation, padded with the
    pad id after each sequence's end; num_generated: [B] int64 (the first EOS
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


def seed_tensor(seed: int, batch: int, device: torch.device) -> torch.Tensor:
    """[B] int64 holding the uint64 seed's bit pattern (DESIGN §3)."""
    s = int(seed)
    if s >= 2**63:
        s -= 2**64
    return torch.full((batch,), s, dtype=torch.int64, device=device)


def normalize_prompts(input_ids) -> torch.Tensor:
    """LongTensor [B, P], a 1-D LongTensor, or a list of 1-D prompts (tensors or
    lists of ints) -> CPU int64 [B, P]. Ragged lists are refused until batching."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype not in (torch.int64, torch.int32):
            fail("input_ids", "an int64 tensor of token ids", f"dtype {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            fail("input_ids", "a [B, L] tensor or a list of 1-D prompts", f"shape {list(input_ids.shape)}")
        prompts = input_ids.detach().to("cpu", torch.int64)
    elif isinstance(input_ids, (list, tuple)):
        if len(input_ids) == 0:
            fail("input_ids", "at least one prompt", "an empty list")
        if all(isinstance(v, int) for v in input_ids):
            input_ids = [input_ids]  # one prompt given as a flat list of ints
        rows = []
        for i, p in enumerate(input_ids):
            p = torch.as_tensor(p)
            if p.dim() != 1 or (p.numel() and p.dtype not in (torch.int64, torch.int32)):
                fail(f"input_ids[{i}]", "a 1-D sequence of int token ids", f"shape {list(p.shape)} dtype {p.dtype}")
            rows.append(p.to(torch.int64))
        if len(rows) > 1:
            raise ValueError(
                f"input_ids: batching is not supported yet: got {len(rows)} prompts, expected 1 "
                "(generate one prompt at a time until batched decoding lands)")
        prompts = rows[0][None]
    else:
        raise TypeError(f"input_ids: expected a LongTensor [B, L] or a list of 1-D prompts, "
                        f"got {type(input_ids).__name__}")
    if prompts.shape[0] != 1:
        raise ValueError(
            f"input_ids: batching is not supported yet: got B={prompts.shape[0]}, expected B=1 "
            "(generate one prompt at a time until batched decoding lands)")
    if prompts.shape[1] < 1:
        fail("input_ids", "a prompt of at least one token", "an empty prompt")
    return prompts


def check_prompt(prompts: torch.Tensor, models: Sequence, max_new_tokens: int) -> int:
    """Token ids in range, prompt shorter than every model's context. Returns L,
    the total length (prompt + budget), capped at the smallest context."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        fail("max_new_tokens", "an int >= 1", max_new_tokens)
    plen = prompts.shape[1]
    ctx = min(int(m.config.max_position_embeddings) for m in models)
    if plen >= ctx:
        fail("input_ids", f"a prompt shorter than the context ({ctx} positions, one left to generate)",
             f"{plen} tokens")
    vocab = min(int(m.config.vocab_size) for m in models)
    lo, hi = int(prompts.min()), int(prompts.max())
    if lo < 0 or hi >= vocab:
        fail("input_ids", f"token ids in [0, {vocab})", f"ids in [{lo}, {hi}]")
    return min(plen + max_new_tokens, ctx)


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


def finish_output(prompts: torch.Tensor, tokens: torch.Tensor, generated: int, total_len: int,
                  max_new_tokens: int, pad_id: Optional[int], accepted: List[List[int]],
                  stats: GenerationStats) -> APDOutput:
    """tokens: [B, total_len] device buffer; keeps prompt + generated, pads the rest."""
    plen = prompts.shape[1]
    pad = pad_id if pad_id is not None else 0
    seq = torch.full((1, plen + max_new_tokens), pad, dtype=torch.int64, device=tokens.device)
    seq[:, : plen + generated] = tokens[:, : plen + generated]
    stats.generated_tokens = generated
    return APDOutput(
        sequences=seq,
        num_generated=torch.tensor([generated], dtype=torch.int64),
        accepted_per_step=accepted,
        stats=stats,
        prompt_lengths=[plen],
    )
