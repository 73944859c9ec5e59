"""The two halves of an APD step and their staging buffer (DESIGN.md §6),
shared by the Engine (decoding/engine.py): the dLLM window forward, the
verifier's M-row forward (CUDA graphs per batch bucket), and the per-step [B]
vectors sent to the device in one copy."""
from __future__ import annotations

from typing import Optional

import torch

from apd_ext.decoding.common import (
    batch_buckets,
    cache_prefix,
    check_kind,
    model_device,
)


def check_pair(dllm, verifier):
    """The pair checks at load: kinds, devices, check_compatible's config checks,
    and for two folders with tokenizers the full pair report (apd_ext.pairs,
    cached per folder pair). Returns the banned id range (start, end) or None."""
    check_kind("dllm", dllm, "dllm")
    check_kind("verifier", verifier, "ar")
    from apd_ext import check_compatible
    from apd_ext.pairs import banned_for_models

    check_compatible(dllm, verifier)
    dd, dv = model_device(dllm), model_device(verifier)
    if dd != dv:
        raise ValueError(f"verifier: expected a model on {dd} (the dLLM's device), got one on {dv}")
    return banned_for_models(dllm, verifier)


class Window:
    """The dLLM half of a step: the forward over each sequence's [left, right)
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

    def live(self, n: int) -> None:
        """The live sequences are rows 0 .. n-1 (after a join or a compaction)."""
        self.cache = cache_prefix(self.base, n)

    def forward(self, win: torch.Tensor, rows: int, args: "StepArgs"):
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


class StepArgs:
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


class Verifier:
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

    def live(self, n: int) -> None:
        """The live sequences are rows 0 .. n-1 (after a join or a compaction)."""
        self.cache = cache_prefix(self.base, n)

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


def window_bounds(t: torch.Tensor, n_prev: torch.Tensor, total: torch.Tensor, W: torch.Tensor,
                  M: torch.Tensor, first: torch.Tensor):
    """DESIGN §6 window of each live sequence, all host [n] int64 (W = -1 for
    W None; first: bool [n], the sequence's own first step):
    right = min(t + M, total); left = 0 on a first step or without a cache,
    else max(t - n_prev - W + 1, 0). Returns (left, right)."""
    cached = ~first & (W >= 0)
    left = torch.where(cached, (t - n_prev - W + 1).clamp_min(0), torch.zeros_like(t))
    right = torch.minimum(t + M, total)
    return left, right
