"""Test-only fault injection for the Engine and the server (never imported by
the product): model wrappers that poison or break the rows of marked
requests. A request is marked by its prompt's FIRST token being `marker`:
a row whose window starts at position 0 (every request's first step, and
every step with W None) shows it in column 0, and no generated token ever
lands at position 0, so an unmarked request is never hit, whatever it samples.
"""
from __future__ import annotations

import copy

import torch


class FaultyModel:
    """Delegates everything to a loaded model (Qwen2Runtime); its forward
    misbehaves on the rows of marked requests:

    mode "nan_logits": the row's logits are NaN (as a corrupt final hidden
        state gives); checks the Engine's non-finite row check, whatever the
        attention kernel does with NaN.
    mode "raise": the whole forward raises RuntimeError (a deterministic
        exception caused by one request); checks the step's bisection.
    mode "fatal": the whole forward raises RuntimeError with a sticky CUDA
        error's message; checks that the Engine does not contain it.
    """

    def __init__(self, model, marker: int, mode: str, only_prefill: bool = False):
        assert mode in ("nan_logits", "raise", "fatal")
        self.model, self.marker, self.mode, self.only_prefill = model, marker, mode, only_prefill
        self.hits = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def marked(self, input_ids: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor) -> torch.Tensor:
        """[B] bool: the rows that see the marker at position 0."""
        return (q_start == 0) & (q_len > 0) & (input_ids[:, 0] == self.marker)

    def forward(self, input_ids, cache, q_start, q_len, logit_rows=None, packing=None):
        hit = self.marked(input_ids, q_start, q_len)
        if self.only_prefill and logit_rows is None:  # the Engine's prefill passes logit_rows=(zero, 1)
            hit = torch.zeros_like(hit)
        if bool(hit.any()):
            self.hits += 1
            if self.mode == "raise":
                raise RuntimeError(f"injected fault: rows {hit.nonzero().flatten().tolist()} are marked")
            if self.mode == "fatal":
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        out = self.model.forward(input_ids, cache, q_start, q_len, logit_rows, packing=packing)
        if self.mode == "nan_logits" and bool(hit.any()):
            out = out.clone()
            out[hit] = float("nan")
        return out

    __call__ = forward


class PrefillFault(FaultyModel):
    """The verifier's join prefill (logit_rows (zero, 1), q_start 0) raises for marked rows."""

    def __init__(self, model, marker: int):
        super().__init__(model, marker, "raise")

    def forward(self, input_ids, cache, q_start, q_len, logit_rows=None, packing=None):
        if logit_rows is not None and bool(self.marked(input_ids, q_start, q_len).any()):
            self.hits += 1
            raise RuntimeError("injected fault: prefill of a marked request")
        return self.model.forward(input_ids, cache, q_start, q_len, logit_rows, packing=packing)

    __call__ = forward


def nan_embedding(model, marker: int):
    """A shallow copy of `model` whose input embedding row `marker` is NaN (a
    corrupt weight row), the output head untouched: only sequences containing
    the marker see NaN, and only through attention (the kernel path: a NaN key
    must make the rows that see it NaN, DESIGN §5)."""
    m = copy.copy(model)
    head_tied = model.lm_head is model.embed
    m.embed = model.embed.clone()
    m.embed[marker] = float("nan")
    if head_tied:  # keep the head finite: the poison is in the input only
        m.lm_head = model.embed
    return m


def attention_propagates_nan() -> bool:
    """Whether this build's window_attention makes a row NaN when a key it
    sees is NaN (as SDPA does)."""
    from apd_ext import ops

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 2, 8, generator=g)  # [B, Lq, Hq, D]
    k = torch.randn(1, 5, 1, 8, generator=g)  # [B, Lmax, Hkv, D]
    v = torch.randn(1, 5, 1, 8, generator=g)
    k[0, 0] = float("nan")
    one = torch.ones(1, dtype=torch.int64)
    out = ops.window_attention(q, k, v, 2 * one, 2 * one, 4 * one, causal=True)
    return bool(out.isnan().all())


class SlowModel:
    """Delegates to a loaded model; every forward first sleeps `seconds` (a
    slow device), so that timeouts and drains can be hit deterministically."""

    def __init__(self, model, seconds: float):
        self.model, self.seconds = model, seconds

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, *args, **kw):
        import time

        time.sleep(self.seconds)
        return self.model.forward(*args, **kw)

    __call__ = forward


class BatchFault:
    """Delegates to a loaded model; its windowed forward (logit_rows given)
    raises for reasons no single request causes: on its first `times` calls
    (a transient fault) or whenever the batch holds at least `min_rows` rows
    (an interaction)."""

    def __init__(self, model, times: int = 0, min_rows: int = 0):
        self.model, self.times, self.min_rows, self.calls = model, times, min_rows, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, input_ids, cache, q_start, q_len, logit_rows=None, packing=None):
        if logit_rows is not None:
            self.calls += 1
            if self.calls <= self.times or (self.min_rows and input_ids.shape[0] >= self.min_rows):
                raise RuntimeError(f"injected batch fault (call {self.calls}, {input_ids.shape[0]} rows)")
        return self.model.forward(input_ids, cache, q_start, q_len, logit_rows, packing=packing)

    __call__ = forward
