"""CUDA-graph capture of one fixed-shape model.forward (the verifier's draft
forward: B sequences x Lw padded rows, on one cache).

The graph is bound to the model, the cache and the static buffers below: a
replay reads input_ids / q_start / q_len (/ row_start) from the static buffers,
writes K/V into the same cache storage, sets cache.lengths in place, and
leaves the logits in `self.logits`, which the next replay overwrites (clone
what you keep). CUDA only; the eager forward is the reference it must match.
"""
from __future__ import annotations

from typing import Optional

import torch

from apd_ext._validate import check_tensor, fail
from apd_ext.models.cache import KVCache


class GraphedForward:
    def __init__(self, model, cache: KVCache, window: int, *, n_rows: Optional[int] = None, warmup: int = 2, pool=None):
        if model.device.type != "cuda":
            fail("model", "a model on a CUDA device (CUDA graphs)", str(model.device))
        if not isinstance(window, int) or window < 1:
            fail("window", "an int >= 1", window)
        self.model, self.cache, self.window, self.n_rows = model, cache, window, n_rows
        B, dev = cache.batch_size, model.device
        self.input_ids = torch.zeros(B, window, dtype=torch.int64, device=dev)  # [B, Lw]
        self.q_start = torch.zeros(B, dtype=torch.int64, device=dev)  # [B]
        self.q_len = torch.zeros(B, dtype=torch.int64, device=dev)  # [B]; 0 = all padding while capturing
        self.row_start = torch.zeros(B, dtype=torch.int64, device=dev) if n_rows is not None else None  # [B]

        # With q_len = 0 every row is padding: warm-up and capture write only the
        # cache's scratch slot. lengths is saved and restored around them.
        saved = cache.lengths.clone()
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self._run()  # [B, Lw or n_rows, V]
        cache.lengths.copy_(saved)

    def _run(self) -> torch.Tensor:
        rows = None if self.n_rows is None else (self.row_start, self.n_rows)
        return self.model.forward(self.input_ids, self.cache, self.q_start, self.q_len, logit_rows=rows)

    def __call__(self, input_ids, q_start, q_len, row_start=None) -> torch.Tensor:
        """Copy the inputs into the static buffers, replay, return self.logits (aliased)."""
        B, dev = self.cache.batch_size, self.model.device
        check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64,), device=dev, shape=(B, self.window))
        check_tensor("q_start", q_start, ndim=1, dtypes=(torch.int32, torch.int64), device=dev, shape=(B,))
        check_tensor("q_len", q_len, ndim=1, dtypes=(torch.int32, torch.int64), device=dev, shape=(B,))
        if (row_start is None) != (self.n_rows is None):
            fail("row_start", "a [B] tensor exactly when captured with n_rows", type(row_start).__name__)
        self.input_ids.copy_(input_ids)
        self.q_start.copy_(q_start)
        self.q_len.copy_(q_len)
        if row_start is not None:
            check_tensor("row_start", row_start, ndim=1, dtypes=(torch.int32, torch.int64), device=dev, shape=(B,))
            self.row_start.copy_(row_start)
        self.graph.replay()
        return self.logits


class BucketedGraphs:
    """Graphs for a window whose length varies (the dLLM's [left, right)): a
    window of Lw rows runs in the graph of the smallest bucket >= Lw, its extra
    rows being padding (q_len is unchanged, so they never touch the cache).
    Each bucket is captured on first use with the LM head on all its rows; the
    call gathers rows row_start .. row_start + n_rows - 1 of each sequence out of
    them (a new tensor). Windows longer than the largest bucket run eagerly."""

    def __init__(self, model, cache: KVCache, buckets=(32, 64, 128, 256)):
        if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
            fail("buckets", "a non-empty list of ints >= 1", buckets)
        self.model, self.cache = model, cache
        self.buckets = sorted(set(buckets))
        self.graphs: dict = {}

    def __call__(self, input_ids, q_start, q_len, row_start, n_rows: int) -> torch.Tensor:
        """input_ids [B, Lw], q_start / q_len / row_start [B] -> logits [B, n_rows, V]."""
        B, Lw = input_ids.shape
        if not isinstance(n_rows, int) or not (1 <= n_rows <= Lw):
            fail("n_rows", f"an int in [1, {Lw}]", n_rows)
        size = next((b for b in self.buckets if b >= Lw), None)
        if size is None:
            return self.model.forward(input_ids, self.cache, q_start, q_len, logit_rows=(row_start, n_rows))
        if size not in self.graphs:
            self.graphs[size] = GraphedForward(self.model, self.cache, size)
        padded = torch.nn.functional.pad(input_ids, (0, size - Lw))  # [B, size]
        logits = self.graphs[size](padded, q_start, q_len)  # [B, size, V]
        rows = row_start.to(torch.int64)[:, None] + torch.arange(n_rows, device=logits.device)  # [B, n_rows]
        return logits.gather(1, rows[:, :, None].expand(B, n_rows, logits.shape[-1]))
