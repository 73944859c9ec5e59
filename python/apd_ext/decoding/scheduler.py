"""The scheduler: the queue, admission, the KV budget and the live rows'
host state (DESIGN.md §6, docs/SERVING.md).

Admission is FIFO at a step boundary: the queue's head joins while a slot
(max_batch) and its KV reservation (prompt + budget, against kv_budget) are
free; nothing overtakes it, so nothing starves. The reservation is taken only
once the join (the runner's verifier prefill) has succeeded: a join that
raises leaves the scheduler as it was; its requests are then joined one by
one, and those that still fail are returned, reserving nothing.

The live requests are rows 0 .. n-1 of every buffer, host and device: the
host state here ([n] int64 each: the next position t, total, the previous
step's n_accept, the request's own step counter, W (-1: no dLLM cache) and
M) sizes the forwards; the runner holds the device rows and the sampler the
rows' sampling settings. When rows leave (or a dry run reorders them),
reorder() moves the survivors to the front of all three with one gather index,
which keeps the verifier's CUDA graphs valid.

Chunked prefill (prefill_chunk N, docs/SEMANTICS.md "Chunked prefill"): a
joining request whose prompt is longer than N (and whose W is not None) is
prefilling until its chunks [0, N), [N, 2N), ... up to the start of its last
chunk are in both caches, one chunk per step (chunks()); meanwhile it drafts
nothing, emits nothing and its step counter stays 0. Its first drafting step
then has left = the last chunk's start (first_left) instead of 0. The KV
reservation is taken at the join as for any request.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Hashable, List, Optional, Tuple

import torch

from apd_ext.decoding.inputs import seed_tensor
from apd_ext.decoding.request import Request
from apd_ext.errors import is_fatal


@dataclass
class Chunks:
    """The chunked prefill of live rows 0 .. k-1 in this step, host [k] each."""

    first_left: torch.Tensor  # int64: the first drafting step's left (0: unchunked)
    pre: torch.Tensor  # bool: prefilling rows (they draft nothing this step)
    start: torch.Tensor  # int64: a prefilling row's chunk [start, end) (the dLLM's) ...
    end: torch.Tensor  # int64
    ver_end: torch.Tensor  # int64: ... and its verifier chunk [start, ver_end) (the last runs on to P - 1)


class Scheduler:
    """max_batch live rows at most; kv_budget KV positions reserved at most;
    rows: the runner, settings: the sampler (join / truncate / reorder move
    their device rows with the host ones); prefill_chunk: None or N (see the
    module docstring)."""

    def __init__(self, max_batch: int, kv_budget: int, rows, settings, prefill_chunk: Optional[int] = None):
        self.max_batch, self.kv_budget, self.rows, self.settings = max_batch, kv_budget, rows, settings
        self.prefill_chunk = prefill_chunk
        self.queue: deque = deque()  # Request, FIFO
        self.live: List[Request] = []  # row i of every buffer is live[i]
        self.reserved = 0  # sum of live[i].total
        z = torch.zeros(0, dtype=torch.int64)
        self.t, self.total, self.n_prev, self.steps = z.clone(), z.clone(), z.clone(), z.clone()  # [n] host
        self.W, self.M = z.clone(), z.clone()  # [n] host; W = -1: no dLLM KV cache (W None)
        # Chunked prefill, [n] host: both caches hold the prompt's [0, fill); a row
        # with fill < first_left is prefilling.
        self.fill, self.first_left = z.clone(), z.clone()

    # ------------------------------------------------------------ requests
    def has(self, request_id: Hashable) -> bool:
        return any(r.request_id == request_id for r in self.live) or \
            any(r.request_id == request_id for r in self.queue)

    def add(self, req: Request) -> None:
        self.queue.append(req)

    def abort(self, request_id: Hashable) -> bool:
        """Drop a queued or live request (its slot and reservation are freed at once)."""
        for r in self.queue:
            if r.request_id == request_id:
                self.queue.remove(r)
                return True
        for i, r in enumerate(self.live):
            if r.request_id == request_id:
                keep = torch.ones(len(self.live), dtype=torch.bool)
                keep[i] = False
                self.retire(keep)
                return True
        return False

    # ----------------------------------------------------------- admission
    def admit(self) -> List[Tuple[Request, Exception]]:
        """FIFO admission (see the module docstring). Returns the requests whose
        join failed, with their exceptions (they are not live, reserve nothing)."""
        new, want = [], self.reserved
        while self.queue and len(self.live) + len(new) < self.max_batch and \
                want + self.queue[0].total <= self.kv_budget:
            r = self.queue.popleft()
            want += r.total
            new.append(r)
        if not new:
            return []
        err = self._try_join(new)
        if err is None:
            return []
        if len(new) == 1:
            return [(new[0], err)]
        return [(r, e) for r in new if (e := self._try_join([r])) is not None]

    def _try_join(self, new: List[Request]) -> Optional[Exception]:
        """_join, rolled back if it raises; returns the exception (None: joined
        and reserved). A fatal device error is raised as it is."""
        n0 = len(self.live)
        try:
            self._join(new)
        except Exception as e:  # noqa: BLE001 (contained: those requests fail alone)
            if is_fatal(e):
                raise
            self._truncate(n0)
            return e
        self.reserved += sum(r.total for r in new)
        return None

    def _join(self, new: List[Request]) -> None:
        """Append the new requests as rows n0 .. n0+k-1 (host state, then the runner's rows)."""
        k = len(new)
        self.live.extend(new)
        z = torch.zeros(k, dtype=torch.int64)
        self.t = torch.cat([self.t, torch.tensor([r.prompt.numel() for r in new], dtype=torch.int64)])
        self.total = torch.cat([self.total, torch.tensor([r.total for r in new], dtype=torch.int64)])
        self.n_prev, self.steps = torch.cat([self.n_prev, z]), torch.cat([self.steps, z])
        self.W = torch.cat([self.W, torch.tensor([-1 if r.cfg.W is None else r.cfg.W for r in new])])
        self.M = torch.cat([self.M, torch.tensor([r.cfg.M for r in new])])
        first_left = torch.tensor([self._first_left(r) for r in new], dtype=torch.int64)  # [k]
        self.fill, self.first_left = torch.cat([self.fill, z]), torch.cat([self.first_left, first_left])
        cpu = torch.device("cpu")
        self.rows.join([r.prompt for r in new], torch.cat([seed_tensor(r.cfg.seed, 1, cpu) for r in new]),
                       chunked=first_left > 0)
        self.settings.join(new)

    def _first_left(self, r: Request) -> int:
        """The first drafting step's left: the start of the prompt's last chunk
        (0 = unchunked: chunking off, a prompt of one chunk, or W None, whose
        every window starts at 0 anyway)."""
        N, P = self.prefill_chunk, r.prompt.numel()
        if N is None or r.cfg.W is None or P <= N:
            return 0
        return N * ((P - 1) // N)

    def _truncate(self, n0: int) -> None:
        """Undo a partial join: keep live rows 0 .. n0-1 (nothing was reserved)."""
        self.live = self.live[:n0]
        self.t, self.total, self.n_prev = self.t[:n0], self.total[:n0], self.n_prev[:n0]
        self.steps, self.W, self.M = self.steps[:n0], self.W[:n0], self.M[:n0]
        self.fill, self.first_left = self.fill[:n0], self.first_left[:n0]
        self.rows.truncate(n0)
        self.settings.truncate(n0)

    # ---------------------------------------------------------- live rows
    def advance(self, n_accept: torch.Tensor, pre: torch.Tensor) -> None:
        """After a committed step: host [n] int64 tokens each live row accepted
        (0 for the prefilling rows, pre [n] bool: they moved one chunk on and
        took no step)."""
        self.t = self.t + n_accept
        self.n_prev = n_accept.clone()
        self.steps = self.steps + (~pre).long()
        if bool(pre.any()):
            self.fill = torch.where(pre, self.fill + self.prefill_chunk, self.fill)

    def retire(self, keep: torch.Tensor) -> None:
        """keep: host [n] bool. The others leave (their reservations are freed);
        the kept rows move to the front of every buffer and cache."""
        for i in (~keep).nonzero().flatten().tolist():
            self.reserved -= self.live[i].total
        self.reorder(keep.nonzero().flatten())

    def reorder(self, stay: torch.Tensor) -> None:
        """stay: host [m] int64 live rows; they become rows 0 .. m-1 of every
        buffer and cache, in that order (a permutation of all rows keeps every
        request; a subset drops the others, see retire)."""
        self.live = [self.live[i] for i in stay.tolist()]
        self.t, self.total, self.n_prev = self.t[stay], self.total[stay], self.n_prev[stay]
        self.steps, self.W, self.M = self.steps[stay], self.W[stay], self.M[stay]
        self.fill, self.first_left = self.fill[stay], self.first_left[stay]
        # No cache row extends past its request's total (DESIGN §6 windows).
        stay_d = self.rows.reorder(stay, int(self.total.max()) if len(self.live) else 0)
        self.settings.reorder(stay_d)

    def host_state(self, k: int) -> tuple:
        """(t, n_prev, total, W, M, steps) of live rows 0 .. k-1, host [k] int64 each."""
        return self.t[:k], self.n_prev[:k], self.total[:k], self.W[:k], self.M[:k], self.steps[:k]

    def chunks(self, k: int) -> Chunks:
        """This step's chunked prefill for live rows 0 .. k-1: a prefilling row
        runs its next chunk [fill, fill + N) (<= first_left < P) in the dLLM, and
        the same positions in the verifier, whose last chunk runs on to P - 1
        (its cache must hold [0, P - 1) before the first drafting step)."""
        t, fill, first_left = self.t[:k], self.fill[:k], self.first_left[:k]
        pre = fill < first_left
        end = fill + (self.prefill_chunk or 0)
        ver_end = torch.where(end >= first_left, t - 1, end)  # t = P while prefilling
        return Chunks(first_left, pre, fill, end, ver_end)


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
