"""Per-row sampling settings for the tests of sample_draft / mixture_accept
with [B] tensor arguments: a mix of every mode (argmax, Gumbel, top-k 1 / odd,
top-p, R 0 / 0.5 / 1, coupled and argmax acceptance, compat="official",
per-row stop ids) and the scalars that row b would be called with alone."""
from __future__ import annotations

import torch

# (temperature, top_k, top_p, R, acceptance, compat), cycled over the rows.
ROW_MODES = (
    (0.0, 0, 1.0, 0.5, "coupled", None),      # argmax draft, coupled target
    (0.7, 0, 1.0, 0.5, "coupled", None),      # plain Gumbel
    (0.7, 1, 1.0, 1.0, "coupled", None),      # top_k 1, R 1 (target == draft)
    (1.3, 5, 0.9, 0.0, "coupled", None),      # odd top_k and top_p, R 0 (the AR row alone)
    (0.5, 0, 0.9, 0.25, "argmax", None),      # top-p draft, argmax acceptance
    (0.7, 7, 0.9, 0.5, "argmax", "official"),  # the released code's arithmetic
    (0.05, 40, 1.0, 0.75, "coupled", None),   # small temperature, a top-k past the candidates
    (0.0, 3, 0.5, 0.5, "argmax", "official"),
)


def mixed_settings(B: int, device, eos_pool=(3, 5, 11)) -> dict:
    """Per-row tensors: temperature, top_p, R float32; top_k int64; acceptance,
    compat int64 codes; eos_ids [B, E] int64 padded with -1 (row b has b % 3 ids)."""
    modes = [ROW_MODES[b % len(ROW_MODES)] for b in range(B)]
    E = len(eos_pool)
    eos = torch.full((B, E), -1, dtype=torch.int64)
    for b in range(B):
        for j in range(b % 3):
            eos[b, j] = eos_pool[(b + j) % E]
    f32 = dict(dtype=torch.float32, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    return dict(
        temperature=torch.tensor([m[0] for m in modes], **f32),
        top_k=torch.tensor([m[1] for m in modes], **i64),
        top_p=torch.tensor([m[2] for m in modes], **f32),
        R=torch.tensor([m[3] for m in modes], **f32),
        acceptance=torch.tensor([int(m[4] == "argmax") for m in modes], **i64),
        compat=torch.tensor([int(m[5] == "official") for m in modes], **i64),
        eos_ids=eos.to(device),
    )


def draft_kwargs(rows: dict) -> dict:
    return {k: rows[k] for k in ("temperature", "top_k", "top_p", "compat")}


def mixture_kwargs(rows: dict) -> dict:
    return {k: rows[k] for k in ("R", "temperature", "top_k", "top_p", "acceptance", "compat", "eos_ids")}


def row_scalars(rows: dict, b: int, mixture: bool) -> dict:
    """The scalar arguments of row b alone (the float32 values as Python floats)."""
    kw = dict(temperature=float(rows["temperature"][b]), top_k=int(rows["top_k"][b]),
              top_p=float(rows["top_p"][b]), compat="official" if int(rows["compat"][b]) else None)
    if mixture:
        eos = [int(e) for e in rows["eos_ids"][b] if int(e) >= 0]
        kw.update(R=float(rows["R"][b]), acceptance="argmax" if int(rows["acceptance"][b]) else "coupled",
                  eos_ids=eos or None)
    return kw


def check_per_row(ops_, dl, al, pos, vl, sd, st, rows, banned=None):
    """The per-row call against each row alone with its scalars, bit for bit
    (draft, target and n_accept); returns the per-row results."""
    draft = ops_.sample_draft(dl, pos, vl, sd, st, banned=banned, **draft_kwargs(rows))
    target, n = ops_.mixture_accept(dl, al, draft, pos, vl, sd, st, banned=banned,
                                    **mixture_kwargs(rows))
    for b in range(dl.shape[0]):
        one = slice(b, b + 1)
        seq = (pos[one], vl[one], sd[one], st[one])
        d1 = ops_.sample_draft(dl[one], *seq, banned=banned, **row_scalars(rows, b, False))
        assert torch.equal(d1[0], draft[b]), f"draft row {b}: {d1[0].tolist()} vs {draft[b].tolist()}"
        t1, n1 = ops_.mixture_accept(dl[one], al[one], draft[one], *seq, banned=banned,
                                     **row_scalars(rows, b, True))
        assert torch.equal(t1[0], target[b]), f"target row {b}: {t1[0].tolist()} vs {target[b].tolist()}"
        assert n1[0] == n[b], f"n_accept row {b}: {int(n1[0])} vs {int(n[b])}"
    return draft, target, n
