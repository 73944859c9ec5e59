"""The model runner (DESIGN.md §6): the device side of a step.

It owns what lives on the device per live row: the token rows ([n, 2L], the
prompt then the committed tokens then [MASK]), the seeds, both models' KV
caches (capacity max_batch, the live rows first) and the per-step argument
vectors. A step here is:

  prepare   the window bounds of each row from the scheduler's host state
            (window_bounds) and each forward's packing plan (its valid rows,
            models/packing.py), staged and sent in ONE host->device copy (StepArgs)
  draft     the dLLM forward over each row's [left, right) (Window; CUDA graphs
            per window bucket with max_batch 1) -> logits of the rows t .. t+m-1
  verify    the verifier's forward over m rows from t-1 (Verifier; one CUDA
            graph of M rows per batch bucket) -> logits [n, m, V_A]
  commit    tokens[b, t_b + j] = draft[b, j] for j < n_accept[b], on the device

With chunked prefill (the scheduler's Chunks), a prefilling row's dLLM window
is its next chunk, it drafts 0 rows, and verify runs one more causal forward
over the prefilling rows' verifier chunks (the others with q_len 0) before the
step's M-row forward. And, between steps, the joins (the verifier's prompt
prefill on join, unless the row is chunked) and the reorders (the survivors
move to the front of every buffer and cache) that the scheduler decides.
The sampler (decoding/sampler.py) turns logits into drafts and acceptance;
nothing here reads the device back to the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from apd_ext.decoding.inputs import model_device, stack_prompts
from apd_ext.models.packing import Packing, pack_index


def batch_buckets(batch: int) -> List[int]:
    """Batch sizes with a captured graph: powers of two below `batch`, and `batch`."""
    out = [1]
    while out[-1] * 2 < batch:
        out.append(out[-1] * 2)
    return sorted(set(out + [batch]))


@dataclass
class StepBatch:
    """One step's shape for live rows 0 .. k-1: host bounds (for the scheduler
    and the output path) and the device vectors the forwards and ops read."""

    k: int  # rows in this step (all live rows, or a dry run's subset)
    left: torch.Tensor  # [k] int64 host: window start per row
    right: torch.Tensor  # [k] int64 host: window end (exclusive)
    rows_t: torch.Tensor  # [k] int64 host: drafted rows per row (>= 1; 0 for a prefilling row)
    pre: torch.Tensor  # [k] bool host: prefilling rows (chunked prefill)
    pre_cols: int  # the longest verifier chunk of a prefilling row (0: none)
    rows: int  # max(rows_t): the logits' row count
    Lw: int  # the dLLM window's width (the longest row's)
    ar: torch.Tensor  # [max(Lw, rows)] int64 device arange
    seeds: torch.Tensor  # [k] int64 device
    args: "StepArgs"  # pos, rows, step, left, window, row_start, ver_start: [k] device views; packing


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
            # Graphed, the window stays dense: at B = 1 it is [left, right)
            # whole (Lw = right - left = N), so a packing plan is the identity.
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
        self.cache = self.base.view(0, n)

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
            packing=args.packing.get("dllm"),  # the valid rows only (sum of windows, not B x Lw)
        )


class StepArgs:
    """The per-step [B] int64 vectors the forwards and ops read on the device,
    and the packing plans of the step's forwards (models/packing.py: [N] flat
    row indices built from host lengths), staged in one host buffer (pinned on
    CUDA) and sent with ONE non-blocking copy: no per-vector host->device
    transfer, no stream synchronisation. Reusing the buffer is safe because
    each step ends with a synchronising read (n_accept), after which the
    previous copy has completed; it grows (a new pinned buffer) only when a
    step's plans outgrow it."""

    FIELDS = ("left", "window", "row_start", "pos", "rows", "step", "ver_start", "pre_start", "pre_len")

    def __init__(self, batch: int, device: torch.device, per_request: bool = False):
        self.device = device
        self.per_request = per_request  # the plans are batch-invariant ones (Packing.per_request)
        self.host = self._alloc(len(self.FIELDS) * batch)  # [9 B + plan rows], int64
        self.packing: dict = {}

    def _alloc(self, size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=torch.int64, pin_memory=self.device.type == "cuda")

    def send(self, n: int, packs: Optional[dict] = None, **values) -> None:
        """values: [n] host vectors (or scalars) for the n live sequences.
        packs: {name: (q_len host [n], Lw, logit_counts host [n] or None)}: each
        forward's plan rides in the same copy and is left in self.packing[name]
        (a Packing; logit_counts: the rows of logit_rows that are each
        sequence's own, which a per_request plan needs)."""
        F = len(self.FIELDS)
        index = {name: pack_index(q_len, Lw) for name, (q_len, Lw, _) in (packs or {}).items()}  # host [N] each
        size = F * n + sum(i.numel() for i in index.values())
        if self.host.numel() < size:
            self.host = self._alloc(max(size, 2 * self.host.numel()))
        host = self.host[:size]
        vec = host[: F * n].view(F, n)
        for i, name in enumerate(self.FIELDS):
            vec[i] = values[name]
        at = F * n
        for i in index.values():
            host[at : at + i.numel()] = i
            at += i.numel()
        if self.device.type == "cuda":
            dev = host.to(self.device, non_blocking=True)
        else:
            dev = host.clone()
        for i, name in enumerate(self.FIELDS):
            setattr(self, name, dev[i * n : (i + 1) * n])  # [n] views
        self.packing, at = {}, F * n
        for name, i in index.items():
            q_len, Lw, counts = packs[name]
            self.packing[name] = Packing(q_len, Lw, dev[at : at + i.numel()], per_request=self.per_request,
                                         logit_counts=counts if self.per_request else None)
            at += i.numel()


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
                self.graphs[nb] = verifier.graphed(self.base.view(0, nb), max_rows)

    def live(self, n: int) -> None:
        """The live sequences are rows 0 .. n-1 (after a join or a compaction)."""
        self.cache = self.base.view(0, n)

    def forward(self, v_in: torch.Tensor, start: torch.Tensor, rows_d: torch.Tensor, rows: int,
                packing: Optional[Packing] = None):
        """v_in: [n, rows] ids, start / rows_d: [n] -> logits [n, rows, V_A].
        packing: the plan of rows_d (eager only). The graphs stay dense: in a
        decode step every row but those in their last step has m = M rows, so
        N = n x M and the graph's padding is the batch bucket's (nb - n) x M
        rows (3 x M of 8 x M at n = 5). A packed graph would replay per N
        bucket instead; with power-of-two N buckets and a power-of-two M
        (16, 32, ...) the bucket of n x M IS nb x M: the same rows and FLOPs,
        for one more graph input and a gather per layer. Finer N buckets
        would multiply the captures."""
        self.cache.crop_(start)
        if not self.graphs:
            return self.model.forward(v_in, self.cache, start, rows_d, logit_rows=None, packing=packing)
        n = v_in.shape[0]
        nb = next(b for b in sorted(self.graphs) if b >= n)
        v_in = torch.nn.functional.pad(v_in, (0, self.max_rows - rows, 0, nb - n))  # [nb, M]
        if nb > n:
            start = torch.nn.functional.pad(start, (0, nb - n))
            rows_d = torch.nn.functional.pad(rows_d, (0, nb - n))  # q_len 0: padding sequences
        return self.graphs[nb](v_in, start, rows_d)[:n, :rows]  # a view of the graph's output


def window_bounds(t: torch.Tensor, n_prev: torch.Tensor, total: torch.Tensor, W: torch.Tensor,
                  M: torch.Tensor, first: torch.Tensor, first_left: Optional[torch.Tensor] = None):
    """DESIGN §6 window of each live sequence, all host [n] int64 (W = -1 for
    W None; first: bool [n], the sequence's own first step):
    right = min(t + M, total); left = 0 on a first step or without a cache,
    else max(t - n_prev - W + 1, 0). first_left: [n] the first step's left
    instead of 0 (chunked prefill: the start of the prompt's last chunk, the
    earlier chunks being in the dLLM's cache; docs/SEMANTICS.md).
    Returns (left, right)."""
    cached = ~first & (W >= 0)
    start = torch.zeros_like(t) if first_left is None else torch.where(first, first_left, 0)
    left = torch.where(cached, (t - n_prev - W + 1).clamp_min(0), start)
    right = torch.minimum(t + M, total)
    return left, right


class ModelRunner:
    """The device state of the live rows and the forwards over them (see the
    module docstring). timer / stats: the engine's (phases "dllm", "verifier";
    forward counters)."""

    def __init__(self, dllm, verifier, batch: int, total_len: int, W: Optional[int], M: Optional[int], *,
                 verifier_rows: int, cuda_graphs: bool, timer, stats, batch_invariant: bool = False):
        self.dllm, self.verifier, self.timer, self.stats = dllm, verifier, timer, stats
        self.total_len = total_len
        self.device = model_device(dllm)
        self.mask_id = int(dllm.config.mask_token_id)
        # The dLLM's graphs are bucketed by window length for B = 1 only (window x
        # batch buckets would multiply the captures); the verifier's cover every
        # batch size (see Verifier).
        self.window = Window(dllm, batch, total_len, W, M, graphs=cuda_graphs and batch == 1)
        self.ver = None if verifier is None else Verifier(verifier, batch, total_len, verifier_rows, cuda_graphs)
        self.args = StepArgs(batch, self.device, per_request=batch_invariant)
        # Width 2L: window gathers and commits index up to left + Lw <= 2L - 1 and
        # t + rows <= L without clamping (no duplicate scatter targets).
        self.tokens = torch.empty((0, 2 * total_len), dtype=torch.int64, device=self.device)  # [n, 2L]
        self.seeds = torch.empty(0, dtype=torch.int64, device=self.device)  # [n]

    # ------------------------------------------------------------- the rows
    def live(self, n: int) -> None:
        """The live sequences are rows 0 .. n-1 (the caches' views; at least one row)."""
        self.window.live(max(n, 1))
        if self.ver is not None:
            self.ver.live(max(n, 1))

    def join(self, prompts: List[torch.Tensor], seeds: torch.Tensor, chunked: Optional[torch.Tensor] = None) -> None:
        """Append rows for the new prompts (CPU int64 each) with their seeds (host
        [k] int64), then prefill the verifier's cache with [0, P-1) of each (the
        dLLM's first step has left = 0, so it recomputes its whole window and
        needs no prefill); chunked: host [k] bool, rows prefilled chunk by chunk
        in the next steps instead. On an exception the caller truncates back."""
        dev, n0, k = self.device, self.tokens.shape[0], len(prompts)
        plens = torch.tensor([p.numel() for p in prompts], dtype=torch.int64)  # [k]
        rows = stack_prompts(prompts, 2 * self.total_len, self.mask_id, dev)  # [k, 2L]
        self.tokens = torch.cat([self.tokens, rows])
        self.seeds = torch.cat([self.seeds, seeds.to(dev)])  # the joiners' seeds cross in one copy
        n = n0 + k
        self.live(n)
        if self.ver is None:
            return
        vlen = plens - 1 if chunked is None else torch.where(chunked, 0, plens - 1)  # [k]
        vmax = int(vlen.max())
        if vmax > 0:  # the verifier's cache holds [0, t-1) before each step
            view = self.ver.base.view(n0, n)
            zero = torch.zeros(k, dtype=torch.int64, device=dev)
            with self.timer("verifier"):
                self.verifier.forward(rows[:, :vmax], view, zero, vlen.to(dev),  # q_len 0: 1-token prompts
                                      logit_rows=(zero, 1), packing=Packing.build(
                                          vlen, vmax, dev, per_request=self.args.per_request,
                                          logit_counts=vlen.clamp(max=1) if self.args.per_request else None))
            self.stats.verifier_forwards += 1

    def truncate(self, n0: int) -> None:
        """Undo a partial join: keep rows 0 .. n0-1."""
        self.tokens, self.seeds = self.tokens[:n0], self.seeds[:n0]
        self.live(n0)

    def reorder(self, stay: torch.Tensor, upto: int) -> torch.Tensor:
        """stay: host [m] int64 rows that become rows 0 .. m-1 of every buffer and
        cache, in that order; upto: a host bound on their cache lengths (only
        [0, upto) moves). Returns stay on the device (the sampler's rows move with it)."""
        n = stay.numel()
        stay_d = stay.to(self.device)
        self.tokens, self.seeds = self.tokens[stay_d], self.seeds[stay_d]
        if n:
            self.window.base.compact_(stay_d, upto)
            if self.ver is not None:
                self.ver.base.compact_(stay_d, upto)
        self.live(n)
        return stay_d

    # ------------------------------------------------------------- the step
    def prepare(self, k: int, t, n_prev, total, W, M, steps, K: Optional[int], chunks=None) -> StepBatch:
        """The bounds of rows 0 .. k-1 from their host state ([k] int64 each, as
        window_bounds takes them; K: tokens per step of the left-to-right
        baseline, else None; chunks: the scheduler's Chunks or None), sent to
        the device in one copy. A prefilling row's window is its chunk; it
        drafts 0 rows, and its step forward in the verifier (q_len 0) starts at
        its verifier chunk's end, where the chunk forward leaves that cache."""
        left, right = window_bounds(t, n_prev, total, W, M, steps == 0, None if chunks is None else chunks.first_left)
        pre = torch.zeros(k, dtype=torch.bool) if chunks is None else chunks.pre
        ver_start, pre_start, pre_len = t - 1, t - 1, torch.zeros_like(t)
        if bool(pre.any()):
            left, right = torch.where(pre, chunks.start, left), torch.where(pre, chunks.end, right)
            ver_start = torch.where(pre, chunks.ver_end, t - 1)
            pre_start = torch.where(pre, chunks.start, ver_start)
            pre_len = torch.where(pre, chunks.ver_end - chunks.start, 0)
        m_t = right - t  # drafted rows per sequence, >= 1 (a prefilling row's: 0, below)
        rows_t = torch.where(pre, 0, m_t if K is None else m_t.clamp(max=K))
        rows = max(int(rows_t.max()), 1)
        row_start = torch.where(pre, 0, t - 1 - left)
        Lw = int(torch.maximum(right - left, row_start + rows).max())
        pre_cols = int(pre_len.max())
        packs = dict(dllm=(right - left, Lw, rows_t))  # the forwards' plans ride in the same copy
        if self.ver is not None:
            packs["ver"] = (rows_t, rows, None)
            if pre_cols:
                packs["pre"] = (pre_len, pre_cols, pre_len.clamp(max=1))  # the verifier's chunk forward
        self.args.send(k, packs, left=left, window=right - left, row_start=row_start, pos=t, rows=rows_t,
                       step=steps, ver_start=ver_start, pre_start=pre_start, pre_len=pre_len)
        ar = torch.arange(max(Lw, rows), device=self.device)
        return StepBatch(k, left, right, rows_t, pre, pre_cols, rows, Lw, ar, self.seeds[:k], self.args)

    def draft_logits(self, b: StepBatch) -> torch.Tensor:
        """The dLLM forward of the step -> logits [k, rows, V_D] of positions t .. t+rows-1."""
        win = self.tokens[: b.k].gather(1, b.args.left[:, None] + b.ar[: b.Lw])  # [k, Lw]
        with self.timer("dllm"):
            out = self.window.forward(win, b.rows, b.args)  # [k, rows, V_D]
        self.stats.dllm_forwards += 1
        return out

    def verify_logits(self, b: StepBatch, draft: torch.Tensor) -> torch.Tensor:
        """The verifier forward over the draft [k, rows] -> logits [k, rows, V_A].
        Row i scores position t+i given x_<t and draft_t .. draft_{t+i-1}. Ids the
        verifier cannot embed are clamped into [0, V_A): a bad row's -1 (that
        request fails once the drafts are read), padding rows' -1, and dLLM ids
        >= V_A (such a draft never matches, DESIGN §4, but the first token of a
        step is accepted anyway and then feeds the next step)."""
        args, rows = b.args, b.rows
        if b.pre_cols:
            self._prefill_chunks(b)
        v_in = torch.cat([self.tokens[: b.k].gather(1, args.ver_start[:, None]), draft[:, : rows - 1]], dim=1)
        v_in.clamp_(0, self.ver.vocab - 1)  # [k, rows]
        with self.timer("verifier"):
            out = self.ver.forward(v_in, args.ver_start, args.rows, rows, args.packing["ver"])  # [k, rows, V_A]
        self.stats.verifier_forwards += 1
        return out

    def _prefill_chunks(self, b: StepBatch) -> None:
        """The verifier's causal forward over the prefilling rows' chunks
        [pre_start, pre_start + pre_len) (the other rows: q_len 0, they only
        touch the scratch slot). The same math as a whole-prompt prefill."""
        args = b.args
        cols = torch.arange(b.pre_cols, device=self.device)
        ids = self.tokens[: b.k].gather(1, args.pre_start[:, None] + cols)  # [k, pre_cols]
        zero = torch.zeros_like(args.pre_start)
        with self.timer("verifier"):
            self.verifier.forward(ids, self.ver.cache, args.pre_start, args.pre_len, logit_rows=(zero, 1),
                                  packing=args.packing["pre"])
        self.stats.verifier_forwards += 1

    def commit(self, b: StepBatch, draft: torch.Tensor, n_acc: torch.Tensor) -> None:
        """tokens[i, t_i + j] = draft[i, j] for j < n_acc[i], on the device (no host
        round trip); draft [n, rows], n_acc [n]."""
        ar = b.ar[: b.rows]
        idx = b.args.pos[:, None] + ar  # [n, rows], < L by construction
        keep = ar < n_acc[:, None]
        self.tokens.scatter_(1, idx, torch.where(keep, draft, self.tokens.gather(1, idx)))
