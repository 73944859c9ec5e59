"""The sampler (DESIGN.md §4): logits -> the step's draft and its acceptance.

draft   ops.sample_draft over the dLLM logits [k, rows, V_D]: one token per
        drafted row from the (seed, step, position) noise, banned ids excluded
accept  APD: ops.mixture_accept over both logits and the draft -> n_accept [k]
        (the coupled mixture test, stop ids end the accepted prefix);
        left-to-right (no verifier): ops.accept_prefix, the draft up to the
        first stop id

The ops take scalar knobs (temperature, top-p, top-k, R, compat, acceptance,
stop ids), so the live rows are grouped by that signature and the ops run once
per group on the group's rows (a single group, the common case, runs on the
whole batch without a gather). The groups are cached for the live set they
were built for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from apd_ext import ops
from apd_ext.config import APDConfig


@dataclass
class _Group:
    cfg: APDConfig  # the group's knobs (its rows share the signature)
    stop_d: Optional[torch.Tensor]  # [E] int64 stop ids on the device, or None
    idx: Optional[torch.Tensor]  # [g] int64 rows on the device; None: every row


class Sampler:
    """device: the models'; banned: (start, end) ids never drafted or accepted
    (the pair checker's) or None; timer: the engine's (phase "sampling").
    The requests passed in carry .cfg (APDConfig), .stop (stop ids) and
    .signature (the ops' knobs)."""

    def __init__(self, device: torch.device, banned, timer):
        self.device, self.banned, self.timer = device, banned, timer
        self._groups: Optional[list] = None
        self._for: Sequence = ()  # the requests self._groups was built for (kept alive: ids stay unique)

    def draft(self, d_logits: torch.Tensor, batch, reqs: Sequence) -> torch.Tensor:
        """d_logits [k, rows, V_D] of rows reqs (k requests) -> draft [k, rows] int64
        (-1 where a row's logits are not finite; padding rows past rows_t too)."""
        a = batch.args
        groups = self._row_groups(reqs)
        with self.timer("sampling"):
            return _per_group(groups, lambda g, sel: ops.sample_draft(
                sel(d_logits), sel(a.pos), sel(a.rows), sel(batch.seeds), sel(a.step),
                temperature=g.cfg.temperature, top_k=g.cfg.top_k, top_p=g.cfg.top_p, compat=g.cfg.compat,
                banned=self.banned, check_lengths=False))  # [k, rows]

    def accept(self, d_logits: torch.Tensor, a_logits: Optional[torch.Tensor], draft: torch.Tensor, batch,
               reqs: Sequence) -> torch.Tensor:
        """-> n_accept [k] int64 (>= 1 per row). a_logits [k, rows, V_A], or None
        for the left-to-right baseline (the draft is accepted up to a stop id)."""
        a = batch.args
        groups = self._row_groups(reqs)
        with self.timer("sampling"):
            if a_logits is None:
                return _per_group(groups, lambda g, sel: ops.accept_prefix(
                    sel(draft), sel(draft), sel(a.rows), eos_ids=g.stop_d, check_lengths=False))
            return _per_group(groups, lambda g, sel: ops.mixture_accept(
                sel(d_logits), sel(a_logits), sel(draft), sel(a.pos), sel(a.rows), sel(batch.seeds), sel(a.step),
                R=g.cfg.R, temperature=g.cfg.temperature, top_k=g.cfg.top_k, top_p=g.cfg.top_p,
                eos_ids=g.stop_d, acceptance=g.cfg.sampling_acceptance, compat=g.cfg.compat,
                banned=self.banned, check_lengths=False)[1])

    def _row_groups(self, reqs: Sequence) -> List[_Group]:
        """The rows of `reqs` grouped by the ops' knobs, cached while the same
        requests hold the same rows (a join, a compaction or a dry run's subset
        builds new groups)."""
        if self._groups is not None and len(reqs) == len(self._for) and \
                all(r is q for r, q in zip(reqs, self._for)):
            return self._groups
        by_sig: Dict[tuple, list] = {}
        for i, r in enumerate(reqs):
            by_sig.setdefault(r.signature, []).append(i)
        groups = []
        for rows in by_sig.values():
            r = reqs[rows[0]]
            idx = None if len(by_sig) == 1 else torch.tensor(rows, dtype=torch.int64).to(self.device)
            stop = torch.tensor(r.stop, dtype=torch.int64).to(self.device) if r.stop else None
            groups.append(_Group(r.cfg, stop, idx))
        self._groups, self._for = groups, list(reqs)
        return groups


def _per_group(groups: List[_Group], call) -> torch.Tensor:
    """call(group, sel) on each group's rows (sel(x) gathers them along dim 0),
    scattered back into one [n, ...] result."""
    if len(groups) == 1 and groups[0].idx is None:
        return call(groups[0], lambda x: x)
    out = None
    for g in groups:
        part = call(g, lambda x, idx=g.idx: x.index_select(0, idx))
        if out is None:
            n = sum(h.idx.numel() for h in groups)
            out = part.new_empty((n,) + tuple(part.shape[1:]))
        out.index_copy_(0, g.idx, part)
    return out
