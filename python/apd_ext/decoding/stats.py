"""A generation's counters and its per-phase timer (dLLM, verifier, sampling),
shared by the Engine and the baselines."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch


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
