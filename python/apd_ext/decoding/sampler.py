"""The sampler (DESIGN.md §4): logits -> the step's draft and its acceptance.

draft   ops.sample_draft over the dLLM logits [k, rows, V_D]: one token per
        drafted row from the (seed, step, position) noise, banned ids excluded
accept  APD: ops.mixture_accept over both logits and the draft -> n_accept [k]
        (the coupled mixture test, stop ids end the accepted prefix);
        left-to-right (no verifier): ops.accept_prefix, the draft up to the
        first stop id

Every request has its own sampling settings (temperature, top-p, top-k, R,
compat, acceptance, stop ids). The ops take them as per-row tensors, so ONE
call of each op per step serves any mix. The sampler keeps those tensors on
the device, row i = live request i, and moves them with the rows: built for
the joiners at join (one host->device copy), gathered at compaction with the
runner's device index (no copy), sliced for a dry run's first k rows (free:
every tensor handed to an op is contiguous). A step adds no copy.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from apd_ext import ops


class Sampler:
    """device: the models'; banned: (start, end) ids never drafted or accepted
    (the pair checker's) or None; timer: the engine's (phase "sampling").
    The scheduler calls join / truncate / reorder with the rows it moves (the
    requests passed in carry .cfg (APDConfig) and .stop (stop ids))."""

    def __init__(self, device: torch.device, banned, timer):
        self.device, self.banned, self.timer = device, banned, timer
        self.floats = torch.empty((2, 0), dtype=torch.float32, device=device)  # [2, n]: temperature, top_p
        # [n] fp64: compat="official" takes 1 - R in fp64 from R, as from the Python float (SEMANTICS.md)
        self.R = torch.empty(0, dtype=torch.float64, device=device)
        self.ints = torch.empty((3, 0), dtype=torch.int64, device=device)  # [3, n]: top_k, acceptance, compat
        self.stop = torch.empty((0, 0), dtype=torch.int64, device=device)  # [n, E] stop ids, -1 padded

    # ------------------------------------------------------------- the rows
    def join(self, new: Sequence) -> None:
        """Append the settings of requests `new` as the last rows. One host->device
        copy: every value is exact in fp64 (fp32 settings, ints below 2^53)."""
        k, E0 = len(new), self.stop.shape[1]
        E = max([E0] + [len(r.stop) for r in new])
        host = torch.full((k, 6 + E), -1.0, dtype=torch.float64)  # [k, 6 + E]
        for i, r in enumerate(new):
            c = r.cfg
            host[i, :6] = torch.tensor([c.temperature, c.top_p, c.R, c.top_k,
                                        int(c.sampling_acceptance in (None, "argmax")),  # None: compat="official"
                                        int(c.compat == "official")], dtype=torch.float64)
            host[i, 6: 6 + len(r.stop)] = torch.tensor(r.stop, dtype=torch.float64)
        d = host.to(self.device)
        stop = self.stop if E0 == E else torch.nn.functional.pad(self.stop, (0, E - E0), value=-1)
        self.floats = torch.cat([self.floats, d[:, :2].t().float()], dim=1)  # fp64 -> fp32: as torch.tensor(x, fp32)
        self.R = torch.cat([self.R, d[:, 2]])
        self.ints = torch.cat([self.ints, d[:, 3:6].t().long()], dim=1)
        self.stop = torch.cat([stop, d[:, 6:].long()])

    def truncate(self, n0: int) -> None:
        """Undo a partial join: keep rows 0 .. n0-1."""
        self.floats, self.ints = self.floats[:, :n0], self.ints[:, :n0]
        self.R, self.stop = self.R[:n0], self.stop[:n0]

    def reorder(self, stay_d: torch.Tensor) -> None:
        """stay_d: [m] int64 rows on the device (the runner's gather index); they
        become rows 0 .. m-1."""
        self.floats, self.ints = self.floats[:, stay_d], self.ints[:, stay_d]
        self.R, self.stop = self.R[stay_d], self.stop[stay_d]

    # ------------------------------------------------------------- the step
    def draft(self, d_logits: torch.Tensor, batch) -> torch.Tensor:
        """d_logits [k, rows, V_D] of live rows 0 .. k-1 -> draft [k, rows] int64
        (-1 where a row's logits are not finite; padding rows past rows_t too)."""
        a = batch.args
        with self.timer("sampling"):
            return ops.sample_draft(d_logits, a.pos, a.rows, batch.seeds, a.step, **self._draft_args(batch.k),
                                    banned=self.banned, check_lengths=False)  # [k, rows]

    def accept(self, d_logits: torch.Tensor, a_logits: Optional[torch.Tensor], draft: torch.Tensor,
               batch) -> torch.Tensor:
        """-> n_accept [k] int64 (>= 1 per row). a_logits [k, rows, V_A], or None
        for the left-to-right baseline (the draft is accepted up to a stop id)."""
        a, k = batch.args, batch.k
        with self.timer("sampling"):
            if a_logits is None:
                return ops.accept_prefix(draft, draft, a.rows, eos_ids=self.stop[:k], check_lengths=False)
            return ops.mixture_accept(d_logits, a_logits, draft, a.pos, a.rows, batch.seeds, a.step,
                                      **self._draft_args(k), R=self.R[:k], acceptance=self.ints[1, :k],
                                      eos_ids=self.stop[:k], banned=self.banned, check_lengths=False)[1]

    def _draft_args(self, k: int) -> dict:
        """The per-row settings sample_draft takes, for rows 0 .. k-1 ([k] each, contiguous)."""
        return dict(temperature=self.floats[0, :k], top_p=self.floats[1, :k], top_k=self.ints[0, :k],
                    compat=self.ints[2, :k])
