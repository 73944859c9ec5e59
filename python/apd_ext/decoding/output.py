"""The output path of the Engine: what a step hands back per request.

After the step's one host read (n_accept and the drafts), each live row's
accepted ids become a StepOutput: its new ids, the stop test (a stop id among
them: "stop"; its total reached: "length"), the text delta and the stop
strings through its RequestText (apd_ext.output: incremental detokenizer +
stops, host-side), and with params["logprobs"] the log-probabilities of its
tokens (computed on the device from the step's logits, read back only for the
rows that asked). A row whose dLLM logits were not finite (the sampler's draft
id -1 in its own rows) gets an "error" output instead, alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, List, Optional, Sequence, Tuple

import torch


@dataclass
class StepOutput:
    """What one live request committed in one step."""

    request_id: Hashable
    new_tokens: List[int]  # the ids accepted this step (the first stop id included)
    step: int  # the request's own 1-based step number
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" (a stop id or string), "length" (budget or context), "abort", "error"
    error: Optional[str] = None  # finish_reason "error": what failed (this request only)
    text: Optional[str] = None  # with an Engine tokenizer: the text delta (apd_ext.output), else None
    # With params["logprobs"] = k: per new token (logprob, [(id, logprob)] * k), from the
    # target distribution the token was checked against (see logprobs()).
    logprobs: Optional[list] = None


def bad_rows(d_host: torch.Tensor, rows_t: torch.Tensor) -> torch.Tensor:
    """d_host: host [n, rows] drafts; rows_t: host [n] drafted rows per row ->
    [n] bool: the rows that drafted -1 in their own rows (non-finite logits)."""
    return ((d_host < 0) & (torch.arange(d_host.shape[1]) < rows_t[:, None])).any(1)


def step_outputs(live: Sequence, steps: torch.Tensor, t: torch.Tensor, total: torch.Tensor,
                 n_accept: torch.Tensor, d_host: torch.Tensor, rows_t: torch.Tensor, bad: torch.Tensor,
                 lps: dict, pre: Optional[torch.Tensor] = None) -> Tuple[List[StepOutput], torch.Tensor]:
    """One StepOutput per live request for the step just computed. Host
    tensors, [n] int64 each unless noted: steps (0-based, before the step), t,
    total, n_accept; d_host [n, rows] drafts; bad [n] bool (bad_rows); lps:
    {row: logprobs}; pre [n] bool or None: prefilling rows (chunked prefill),
    which drafted nothing and get no output. Returns (outputs, done [n] bool:
    the rows that finished)."""
    outs: List[StepOutput] = []
    done = bad.clone()
    for i, req in enumerate(live):
        if pre is not None and pre[i]:
            continue
        if bad[i]:
            j = int((d_host[i, : int(rows_t[i])] < 0).nonzero()[0])
            outs.append(StepOutput(req.request_id, [], int(steps[i]) + 1, True, "error", (
                f"step {int(steps[i])}: the dLLM logits row for position {int(t[i]) + j} is not finite "
                "(NaN or all -inf), so no token could be drafted there; check the model's weights and dtype")))
            continue
        new = d_host[i, : int(n_accept[i])].tolist()
        out = StepOutput(req.request_id, new, int(steps[i]) + 1)
        if i in lps:
            out.logprobs = lps[i][: len(new)]
        if not req.stop_set.isdisjoint(new):
            out.finished, out.finish_reason = True, "stop"
        elif int(t[i]) + len(new) >= int(total[i]):
            out.finished, out.finish_reason = True, "length"
        if req.text is not None:  # text delta + stop strings (host, this step's ids only)
            out.text, hit = req.text.update(new, out.finished)
            if hit:
                out.finished, out.finish_reason = True, "stop"
        done[i] = out.finished
        outs.append(out)
    return outs, done


def logprobs(live: Sequence, want: List[int], d_logits: torch.Tensor, a_logits: Optional[torch.Tensor],
             draft: torch.Tensor) -> dict:
    """Log-probabilities of the drafted tokens of rows `want` (each live[i] with
    .logprobs = k alternatives and .cfg.R) under the target distribution they
    are checked against, computed on the device from the step's logits rows
    (d_logits [n, rows, V_D], a_logits [n, rows, V_A] or None, draft [n, rows])
    and read to the host only for these rows:
    APD: log_softmax(R * log_softmax(dLLM) + (1 - R) * log_softmax(AR)) over
    the shared vocabulary (the coupled mixture of DESIGN §4 / SEMANTICS, at
    temperature 1, before top-k / top-p); left-to-right: the dLLM's
    log_softmax. A drafted id outside the verifier's vocabulary has -inf.
    -> {row: [(logprob, [(id, logprob)] * k)] per drafted row}."""
    device = d_logits.device
    idx = torch.tensor(want, dtype=torch.int64).to(device)
    d = d_logits.index_select(0, idx).float()  # [w, rows, V_D]
    tok = draft.index_select(0, idx)  # [w, rows]
    if a_logits is None:
        m = torch.log_softmax(d, -1)
    else:
        a = a_logits.index_select(0, idx).float()  # [w, rows, V_A]
        V = min(d.shape[-1], a.shape[-1])
        R = torch.tensor([live[i].cfg.R for i in want], dtype=torch.float32, device=device)[:, None, None]
        mix = R * torch.log_softmax(d, -1)[..., :V] + (1 - R) * torch.log_softmax(a, -1)[..., :V]
        m = torch.log_softmax(mix, -1)
    V = m.shape[-1]
    lp = m.gather(-1, tok.clamp(0, V - 1)[..., None])[..., 0]  # [w, rows]
    lp = torch.where((tok >= 0) & (tok < V), lp, torch.full_like(lp, float("-inf")))
    k = max(live[i].logprobs for i in want)
    top_v, top_i = m.topk(k, -1) if k else (m[..., :0], m[..., :0].long())  # [w, rows, k]
    lp, top_v, top_i = lp.cpu().tolist(), top_v.cpu().tolist(), top_i.cpu().tolist()
    out = {}
    for w, i in enumerate(want):
        ki = live[i].logprobs
        out[i] = [(lp[w][j], list(zip(top_i[w][j][:ki], top_v[w][j][:ki]))) for j in range(len(lp[w]))]
    return out
