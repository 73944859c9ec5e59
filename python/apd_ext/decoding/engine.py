"""Continuous batching for APD (and its left-to-right baseline): the Engine.

Requests join the live batch at step boundaries (with their prefill) and
leave it as soon as they finish or are aborted; the live sequences are rows
0 .. n-1 of every device buffer and of the capacity-max_batch caches (one
gather moves the survivors to the front when some leave, which keeps the
verifier's CUDA graphs valid).

Batch invariance is the contract (DESIGN §6): a request's tokens depend only
on its prompt and its own parameters, never on what runs beside it or when it
arrived. So every piece of per-request state travels with its row: its own
step counter (the noise is f(seed, step, position), and step 0 is its first
step, whose window starts at 0), its own W / M bounds, seed and budget. The
sampling ops take scalar knobs (temperature, top-p, top-k, R, compat,
acceptance, stop ids): rows are grouped by that signature and the ops run once
per group on the group's rows, while both forwards stay batched.

One step = (admission + prefill of new requests) + one dLLM forward + the
draft + one verifier forward + acceptance + the commit on the device + ONE
host read (n_accept with the drafts, for streaming and the bad-row check).
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, fields
from typing import Dict, Hashable, List, Optional, Union

import torch

from apd_ext import ops
from apd_ext._validate import fail
from apd_ext.config import APDConfig
from apd_ext.decoding.common import (
    check_token_ids,
    check_progress,
    GenerationStats,
    PhaseTimer,
    check_kind,
    compact_cache_,
    model_device,
    resolve_eos,
    seed_tensor,
    stack_prompts,
)
from apd_ext.decoding.step import StepArgs, Verifier, Window, check_pair, window_bounds
from apd_ext.errors import is_fatal
from apd_ext.output.stops import RequestText, check_stop_strings

_CONFIG_FIELDS = tuple(f.name for f in fields(APDConfig))
PARAM_FIELDS = _CONFIG_FIELDS + ("stop_token_ids", "stop", "logprobs")
MAX_LOGPROBS = 20  # top alternatives per token at most (OpenAI's limit)


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
    # target distribution the token was checked against (see Engine._logprobs).
    logprobs: Optional[list] = None


@dataclass
class _Request:
    request_id: Hashable
    prompt: torch.Tensor  # [P] int64, CPU
    cfg: APDConfig
    stop: tuple  # stop token ids
    total: int  # prompt + budget, capped at the context: the KV positions it reserves
    signature: tuple  # the scalar knobs of the ops (rows with equal signatures share a call)
    stops: tuple = ()  # stop strings (host-side, apd_ext.output)
    text: Optional[RequestText] = None  # the output path, with an Engine tokenizer
    logprobs: Optional[int] = None  # top alternatives per token to return; None: no logprobs

    def __post_init__(self):
        self.stop_set = frozenset(self.stop)  # the step's stop test, without a Python loop over tokens


class Engine:
    """Step-level scheduler over one dLLM (+ one verifier) on one device.

    config: the defaults of every request (APDConfig); config.M is also the
    largest lookahead a request may ask for (it sizes the verifier's graphs).
    max_batch: live sequences at most. max_len: positions per sequence
    (prompt + max_new_tokens; default min(context, 4096)); the caches are
    dense [max_batch, max_len]. kv_budget: KV positions (tokens) the live
    requests may reserve together, each reserving prompt + budget (default
    max_batch * max_len). A request that can never fit (more than max_len or
    kv_budget positions) is refused by add_request; one that does not fit now
    waits in a FIFO queue and is admitted at a later step boundary.
    verifier None with K: the left-to-right baseline (K tokens per step).
    cuda_graphs: the verifier's M-row forward replays a CUDA graph per batch
    bucket; with max_batch 1 the dLLM's windows too (CUDA only).
    tokenizer: a transformers tokenizer of the pair: every StepOutput then
    carries its text delta (incremental detokenizer, apd_ext.output) and
    requests may give stop strings (params["stop"]), checked on the host each
    step: the step that produces one finishes the request ("stop") and the
    text is cut before it.
    """

    def __init__(self, dllm, verifier, config: Optional[APDConfig] = None, max_batch: int = 8, *,
                 max_len: Optional[int] = None, kv_budget: Optional[int] = None, K: Optional[int] = None,
                 cuda_graphs: bool = False, tokenizer=None, _verifier_rows: Optional[int] = None,
                 _graphs_checked: bool = False):
        cfg = config if config is not None else APDConfig()
        if not isinstance(cfg, APDConfig):
            raise TypeError(f"config: expected an APDConfig or None, got {type(cfg).__name__}")
        self.banned = None  # (start, end): ids never drafted or accepted (the pair checker's)
        if verifier is None:
            check_kind("dllm", dllm, "dllm")
            if isinstance(K, bool) or not isinstance(K, int) or K < 1:
                fail("K", "an int >= 1 (tokens per step) when verifier is None", K)
        else:
            self.banned = check_pair(dllm, verifier)
            if K is not None:
                fail("K", "None when a verifier is given (APD accepts adaptively)", K)
        _check_count("max_batch", max_batch)
        self.dllm, self.verifier, self.config, self.K = dllm, verifier, cfg, K
        self.tokenizer = tokenizer
        self.device = model_device(dllm)
        if cuda_graphs and not _graphs_checked and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs: expected models on a CUDA device, got {self.device}")
        models = [dllm] if verifier is None else [dllm, verifier]
        self.context = min(int(m.config.max_position_embeddings) for m in models)
        self.models = models  # the prompt ids must fit each one's vocabulary
        if max_len is None:
            max_len = min(self.context, 4096)
        _check_count("max_len", max_len)
        if max_len > self.context:
            fail("max_len", f"at most the models' context ({self.context})", max_len)
        if kv_budget is None:
            kv_budget = max_batch * max_len
        _check_count("kv_budget", kv_budget)
        self.max_batch, self.max_len, self.kv_budget = max_batch, max_len, kv_budget
        self.mask_id = int(dllm.config.mask_token_id)
        self.default_stop = tuple(resolve_eos(dllm, None))

        B, L = max_batch, max_len
        # The dLLM's graphs are bucketed by window length for B = 1 only (window x
        # batch buckets would multiply the captures); the verifier's cover every
        # batch size (see Verifier).
        self.window = Window(dllm, B, L, cfg.W, cfg.M, graphs=cuda_graphs and B == 1)
        self.ver = None
        if verifier is not None:
            rows = _verifier_rows if _verifier_rows is not None else min(cfg.M, L)
            self.ver = Verifier(verifier, B, L, rows, cuda_graphs)
        self.args = StepArgs(B, self.device)
        self.stats = GenerationStats()
        self.timer = PhaseTimer(self.device)
        self._n_accept_override: Optional[int] = None  # benchmarking hook (bench.py)
        self._trace: Optional[list] = None  # tests only: per step [(request_id, left, right, n_accept)]
        self._ids = itertools.count()

        self.queue: deque = deque()  # _Request, FIFO
        self.live: List[_Request] = []  # row i of every buffer is live[i]
        self.reserved = 0  # sum of live[i].total
        # Width 2L: window gathers and commits index up to left + Lw <= 2L - 1 and
        # t + rows <= L without clamping (no duplicate scatter targets).
        self.tokens = torch.empty((0, 2 * L), dtype=torch.int64, device=self.device)  # [n, 2L]
        self.seeds = torch.empty(0, dtype=torch.int64, device=self.device)  # [n]
        # Host loop state of the live rows (they size the forwards): [n] int64 each.
        z = torch.zeros(0, dtype=torch.int64)
        self.t, self.total, self.n_prev, self.steps = z.clone(), z.clone(), z.clone(), z.clone()
        self.W, self.M = z.clone(), z.clone()  # W = -1: no dLLM KV cache (W None)
        self._groups = None  # cached per-signature row groups, rebuilt when the live set changes

    # ------------------------------------------------------------ requests
    def add_request(self, prompt_ids, params: Union[None, APDConfig, dict] = None,
                    request_id: Optional[Hashable] = None) -> Hashable:
        """Queue a request; returns its id. prompt_ids: a 1-D int tensor or a list
        of ints. params: None (the engine's config), an APDConfig, or a dict of
        APDConfig fields (R, W, M, temperature, top_p, top_k, acceptance, compat,
        seed, max_new_tokens) and stop_token_ids (default: the checkpoint's
        EOS), applied over the engine's config. Raises ValueError/TypeError
        naming the field for anything invalid or that can never fit; a request
        that passes is never refused later."""
        req = self.check_request(prompt_ids, params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if any(r.request_id == request_id for r in itertools.chain(self.live, self.queue)):
            fail("request_id", "an id not already queued or running", repr(request_id))
        req.request_id = request_id
        if self.tokenizer is not None:
            req.text = RequestText(self.tokenizer, req.stops, req.stop)
        self.queue.append(req)
        return request_id

    def check_request(self, prompt_ids, params=None) -> "_Request":
        """add_request's checks without queueing anything (a server validates
        with it before handing the request to its step loop)."""
        prompt = self._check_prompt(prompt_ids)
        cfg, stop, stops, logprobs = self._params(params)
        P = prompt.numel()
        total = min(P + cfg.max_new_tokens, self.context)
        if P >= self.max_len:
            fail("prompt_ids", f"a prompt shorter than the engine's max_len ({self.max_len} positions, "
                 "one left to generate)", f"{P} tokens")
        if total > self.max_len:
            fail("max_new_tokens", f"at most {self.max_len - P} for this {P}-token prompt (max_len "
                 f"{self.max_len})", cfg.max_new_tokens)
        if total > self.kv_budget:
            fail("max_new_tokens", f"prompt + max_new_tokens within the KV budget ({self.kv_budget} tokens)",
                 cfg.max_new_tokens)
        sig = (cfg.R, cfg.temperature, cfg.top_p, cfg.top_k, cfg.compat, cfg.sampling_acceptance, stop)
        return _Request(None, prompt, cfg, stop, total, sig, stops, logprobs=logprobs)

    def abort(self, request_id: Hashable) -> bool:
        """Drop a queued or running request (its slot and KV reservation are
        freed at once). Returns whether it was found."""
        for r in self.queue:
            if r.request_id == request_id:
                self.queue.remove(r)
                return True
        for i, r in enumerate(self.live):
            if r.request_id == request_id:
                keep = torch.ones(len(self.live), dtype=torch.bool)
                keep[i] = False
                self._compact(keep)
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.live) or bool(self.queue)

    @property
    def num_live(self) -> int:
        return len(self.live)

    @property
    def num_queued(self) -> int:
        return len(self.queue)

    # ---------------------------------------------------------------- step
    def step(self) -> List[StepOutput]:
        """Admit what fits, run one APD step over the live batch, retire the
        finished. Returns one StepOutput per request that was live this step
        (and one, finish_reason "error", per request whose join failed).

        Failure containment (per request, docs/SERVING.md): a row whose dLLM
        logits are not finite (the sampler's draft id -1) finishes alone with
        "error". When the step's compute raises, the rows are bisected with
        dry runs of the same step (nothing is committed before the host read,
        and a dry run rewrites the caches with what the real run writes) until
        the subsets that still raise are single requests: those fail, the rest
        run the step. A failure that no subset reproduces is retried once,
        then fails the rows of that step. A fatal device error (errors.is_fatal)
        is raised as it is: nothing on that device can be trusted any more."""
        outs = self._admit()
        retried = False
        while True:
            n = len(self.live)
            if n == 0:
                return outs
            try:
                res = self._compute(n)
                host = torch.cat([res["n_acc"], res["draft"].reshape(-1)]).cpu()
                break
            except Exception as e:  # noqa: BLE001 (contained per request below)
                if is_fatal(e):
                    raise
                culprits = self._isolate(e)
                if not culprits:
                    if not retried:
                        retried = True
                        continue
                    culprits = {id(r): (r, e) for r in self.live}
                outs += self._fail([r for r, _ in culprits.values()],
                                   {id(r): f"{type(err).__name__}: {err}" for r, err in culprits.values()})
        return outs + self._commit(n, res, host)

    def _compute(self, k: int) -> dict:
        """The step's forwards and ops for live rows 0 .. k-1 (k < n: a dry run
        of a subset, see _isolate). Writes the caches (as the real step would)
        and nothing else of the engine's state."""
        dev, K, timer, stats = self.device, self.K, self.timer, self.stats
        t, steps = self.t[:k], self.steps[:k]
        left_t, right_t = window_bounds(t, self.n_prev[:k], self.total[:k], self.W[:k], self.M[:k], steps == 0)
        m_t = right_t - t  # drafted rows per sequence, >= 1
        rows_t = m_t if K is None else m_t.clamp(max=K)
        rows = int(rows_t.max())
        row_start = t - 1 - left_t
        Lw = int(torch.maximum(right_t - left_t, row_start + rows).max())
        args = self.args
        args.send(k, left=left_t, window=right_t - left_t, row_start=row_start, pos=t, rows=rows_t,
                  step=steps, ver_start=t - 1)
        pos_d, step_d, rows_d, seeds_d = args.pos, args.step, args.rows, self.seeds[:k]  # [k] each, on the device
        ar = torch.arange(max(Lw, rows), device=dev)

        win = self.tokens[:k].gather(1, args.left[:, None] + ar[:Lw])  # [k, Lw]
        with timer("dllm"):
            d_logits = self.window.forward(win, rows, args)  # [k, rows, V_D]
        stats.dllm_forwards += 1
        groups = self._row_groups(k)
        with timer("sampling"):
            draft = self._per_group(groups, lambda g, sel: ops.sample_draft(
                sel(d_logits), sel(pos_d), sel(rows_d), sel(seeds_d), sel(step_d), temperature=g.cfg.temperature,
                top_k=g.cfg.top_k, top_p=g.cfg.top_p, compat=g.cfg.compat, banned=self.banned,
                check_lengths=False))  # [k, rows]

        if self.ver is not None:
            # Row i of the verifier scores position t+i given x_<t and draft_t .. draft_{t+i-1}.
            # Ids the verifier cannot embed are clamped into [0, V_A): a bad row's
            # -1 (that request fails once the drafts are read), padding rows' -1, and
            # dLLM ids >= V_A (such a draft never matches, DESIGN §4, but the
            # first token of a step is accepted anyway and then feeds the next step).
            v_in = torch.cat([self.tokens[:k].gather(1, args.ver_start[:, None]), draft[:, : rows - 1]], dim=1)
            v_in.clamp_(0, self.ver.vocab - 1)  # [k, rows]
            with timer("verifier"):
                a_logits = self.ver.forward(v_in, args.ver_start, rows_d, rows)  # [k, rows, V_A]
            stats.verifier_forwards += 1
            with timer("sampling"):
                n_acc = self._per_group(groups, lambda g, sel: ops.mixture_accept(
                    sel(d_logits), sel(a_logits), sel(draft), sel(pos_d), sel(rows_d), sel(seeds_d), sel(step_d),
                    R=g.cfg.R, temperature=g.cfg.temperature, top_k=g.cfg.top_k, top_p=g.cfg.top_p,
                    eos_ids=g.stop_d, acceptance=g.cfg.sampling_acceptance, compat=g.cfg.compat,
                    banned=self.banned, check_lengths=False)[1])  # [k]
        else:
            with timer("sampling"):
                n_acc = self._per_group(groups, lambda g, sel: ops.accept_prefix(
                    sel(draft), sel(draft), sel(rows_d), eos_ids=g.stop_d, check_lengths=False))  # [k]
        if self._n_accept_override is not None:  # benchmarking only: a fixed acceptance schedule
            n_acc = torch.minimum(torch.full_like(n_acc, self._n_accept_override), rows_d)
        return dict(draft=draft, n_acc=n_acc, left=left_t, right=right_t, rows_t=rows_t, rows=rows, ar=ar,
                    d_logits=d_logits, a_logits=a_logits if self.ver is not None else None)  # logits: for logprobs

    def _commit(self, n: int, res: dict, host: torch.Tensor) -> List[StepOutput]:
        """Commit the step computed for all n live rows; host: n_accept then the
        drafts, read in the step's one host synchronisation."""
        draft, n_acc, rows_t, rows, ar = res["draft"], res["n_acc"], res["rows_t"], res["rows"], res["ar"]
        t, steps, pos_d = self.t, self.steps, self.args.pos
        # Commit on the device (no host round trip): tokens[b, t_b + j] = draft[b, j] for j < n_acc[b].
        idx = pos_d[:, None] + ar[:rows]  # [n, rows], < L by construction
        keep = ar[:rows] < n_acc[:, None]
        self.tokens.scatter_(1, idx, torch.where(keep, draft, self.tokens.gather(1, idx)))
        n_h = host[:n]  # [n]
        d_host = host[n:].view(n, rows)  # [n, rows]
        # A row whose dLLM logits were not finite (NaN, or all -inf) drafted -1
        # somewhere in its own rows: that request fails, alone.
        bad = ((d_host < 0) & (ar[:rows].cpu() < rows_t[:, None])).any(1)  # [n] bool
        good = (~bad).nonzero().flatten()
        self._inspect(res["left"][good], res["right"][good], n_h[good], good.tolist())
        want = [i for i, r in enumerate(self.live) if r.logprobs is not None and not bool(bad[i])]
        lps = self._logprobs(want, res["d_logits"], res["a_logits"], draft) if want else {}

        outs: List[StepOutput] = []
        done = bad.clone()
        for i, req in enumerate(self.live):
            if bad[i]:
                j = int((d_host[i, : int(rows_t[i])] < 0).nonzero()[0])
                outs.append(StepOutput(req.request_id, [], int(steps[i]) + 1, True, "error", (
                    f"step {int(steps[i])}: the dLLM logits row for position {int(t[i]) + j} is not finite "
                    "(NaN or all -inf), so no token could be drafted there; check the model's weights and dtype")))
                continue
            new = d_host[i, : int(n_h[i])].tolist()
            out = StepOutput(req.request_id, new, int(steps[i]) + 1)
            if i in lps:
                out.logprobs = lps[i][: len(new)]
            if not req.stop_set.isdisjoint(new):
                out.finished, out.finish_reason = True, "stop"
            elif int(t[i]) + len(new) >= int(self.total[i]):
                out.finished, out.finish_reason = True, "length"
            if req.text is not None:  # the output path: text delta + stop strings (host, this step's ids only)
                out.text, hit = req.text.update(new, out.finished)
                if hit:
                    out.finished, out.finish_reason = True, "stop"
            done[i] = out.finished
            outs.append(out)
        self.stats.steps += 1
        self.t = t + n_h
        self.n_prev = n_h.clone()
        self.steps = steps + 1
        if bool(done.any()):
            self._compact(~done)
        return outs

    def _logprobs(self, want: List[int], d_logits, a_logits, draft) -> dict:
        """Log-probabilities of the drafted tokens of rows `want` under the
        target distribution they are checked against, computed on the device
        from the step's logits rows and read to the host only for these rows:
        APD: log_softmax(R * log_softmax(dLLM) + (1 - R) * log_softmax(AR)) over
        the shared vocabulary (the coupled mixture of DESIGN §4 / SEMANTICS, at
        temperature 1, before top-k / top-p); left-to-right: the dLLM's
        log_softmax. A drafted id outside the verifier's vocabulary has -inf.
        -> {row: [(logprob, [(id, logprob)] * k)] per drafted row}."""
        idx = torch.tensor(want, dtype=torch.int64).to(self.device)
        d = d_logits.index_select(0, idx).float()  # [w, rows, V_D]
        tok = draft.index_select(0, idx)  # [w, rows]
        if a_logits is None:
            m = torch.log_softmax(d, -1)
        else:
            a = a_logits.index_select(0, idx).float()  # [w, rows, V_A]
            V = min(d.shape[-1], a.shape[-1])
            R = torch.tensor([self.live[i].cfg.R for i in want], dtype=torch.float32, device=self.device)[:, None, None]
            mix = R * torch.log_softmax(d, -1)[..., :V] + (1 - R) * torch.log_softmax(a, -1)[..., :V]
            m = torch.log_softmax(mix, -1)
        V = m.shape[-1]
        lp = m.gather(-1, tok.clamp(0, V - 1)[..., None])[..., 0]  # [w, rows]
        lp = torch.where((tok >= 0) & (tok < V), lp, torch.full_like(lp, float("-inf")))
        k = max(self.live[i].logprobs for i in want)
        top_v, top_i = m.topk(k, -1) if k else (m[..., :0], m[..., :0].long())  # [w, rows, k]
        lp, top_v, top_i = lp.cpu().tolist(), top_v.cpu().tolist(), top_i.cpu().tolist()
        out = {}
        for w, i in enumerate(want):
            ki = self.live[i].logprobs
            out[i] = [(lp[w][j], list(zip(top_i[w][j][:ki], top_v[w][j][:ki]))) for j in range(len(lp[w]))]
        return out

    def _isolate(self, err: Exception) -> dict:
        """The step raised `err` over the live rows: bisect them with dry runs
        (_compute on a subset moved to the front) down to the single requests
        that raise alone. Returns {id(request): (request, its exception)};
        empty when no subset reproduces the failure."""
        culprits: dict = {}
        n = len(self.live)

        def probe(group: list):
            ids = {id(r) for r in group}
            order = [i for i, r in enumerate(self.live) if id(r) in ids]
            order += [i for i, r in enumerate(self.live) if id(r) not in ids]
            self._reorder(torch.tensor(order, dtype=torch.int64))
            self.window.live(len(group))
            if self.ver is not None:
                self.ver.live(len(group))
            try:
                res = self._compute(len(group))
                res["draft"].cpu()  # surface an asynchronous device error here
                return None
            except Exception as e:  # noqa: BLE001
                if is_fatal(e):
                    raise
                return e
            finally:
                self.window.live(n)
                if self.ver is not None:
                    self.ver.live(n)

        def bisect(group: list, e: Exception, probed: bool) -> None:
            if len(group) == 1:
                if not probed:  # a step of one row: blame it only if a re-run raises too
                    e = probe(group)
                if e is not None:
                    culprits[id(group[0])] = (group[0], e)
                return
            for half in (group[: len(group) // 2], group[len(group) // 2:]):
                he = probe(half)
                if he is not None:
                    bisect(half, he, True)

        bisect(list(self.live), err, False)
        return culprits

    def _fail(self, reqs: list, why: dict) -> List[StepOutput]:
        """Retire live requests `reqs` with finish_reason "error" (why: {id(request): message})."""
        drop = {id(r) for r in reqs}
        keep = torch.tensor([id(r) not in drop for r in self.live], dtype=torch.bool)
        outs = [StepOutput(r.request_id, [], int(s) + 1, True, "error", why[id(r)])
                for r, s in zip(self.live, self.steps.tolist()) if id(r) in drop]
        self._compact(keep)
        return outs

    def _inspect(self, left: torch.Tensor, right: torch.Tensor, n_accept: torch.Tensor, rows: list) -> None:
        """The per-step checkpoint right after the host read, before anything
        is retired: left / right / n_accept are host [m] int64 for the rows
        `rows` of self.live that drafted (every row but the non-finite ones;
        self.steps still holds each row's 0-based step). The place for
        invariant checks (e.g. a live row that accepted nothing) and trace hooks."""
        live = [self.live[i] for i in rows]
        check_progress(self.steps[rows], self.t[rows], n_accept, [r.request_id for r in live])
        if self._trace is not None:  # tests only: per-step window bounds and acceptance
            self._trace.append([(r.request_id, int(lo), int(hi), int(k))
                                for r, lo, hi, k in zip(live, left, right, n_accept)])

    def finish_all(self) -> List[StepOutput]:
        """Retire every live request as it stands ("length"); the queue stays.
        (Used by the benchmarks' fixed step counts.)"""
        outs = [StepOutput(r.request_id, [], int(s), True, "length") for r, s in zip(self.live, self.steps.tolist())]
        if self.live:
            self._compact(torch.zeros(len(self.live), dtype=torch.bool))
        return outs

    # ------------------------------------------------------------- helpers
    def _check_prompt(self, prompt_ids) -> torch.Tensor:
        p = prompt_ids
        if isinstance(p, torch.Tensor):
            if p.dim() != 1 or p.dtype not in (torch.int64, torch.int32):
                fail("prompt_ids", "a 1-D int tensor of token ids", f"shape {list(p.shape)} dtype {p.dtype}")
            p = p.detach().to("cpu", torch.int64)
        elif isinstance(p, (list, tuple)):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in p):
                fail("prompt_ids", "a list of int token ids", "non-int entries")
            p = torch.tensor(list(p), dtype=torch.int64)
        else:
            raise TypeError(f"prompt_ids: expected a 1-D LongTensor or a list of ints, got {type(p).__name__}")
        if p.numel() == 0:
            fail("prompt_ids", "a prompt of at least one token", "an empty prompt")
        check_token_ids("prompt_ids", p, self.models)
        return p.contiguous()

    def _params(self, params):
        stop, stops, logprobs = self.default_stop, (), None
        if params is None:
            cfg = self.config
        elif isinstance(params, APDConfig):
            cfg = params
        elif isinstance(params, dict):
            unknown = sorted(set(params) - set(PARAM_FIELDS))
            if unknown:
                fail(f"params[{unknown[0]!r}]", f"one of {list(PARAM_FIELDS)}", "an unknown field")
            over = dict(params)
            if over.get("stop_token_ids", None) is not None:
                stop = tuple(resolve_eos(self.dllm, over["stop_token_ids"]))
            over.pop("stop_token_ids", None)
            stops = check_stop_strings(over.pop("stop", None))
            logprobs = over.pop("logprobs", None)
            if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                         or not 0 <= logprobs <= MAX_LOGPROBS):
                fail("logprobs", f"None or an int in [0, {MAX_LOGPROBS}] (top alternatives per token)", logprobs)
            if stops and self.tokenizer is None:
                fail("stop", "an Engine built with tokenizer=... (stop strings are matched on the text)",
                     repr(list(stops)))
            cfg = self.config.replace(**over)
        else:
            raise TypeError(f"params: expected None, an APDConfig or a dict, got {type(params).__name__}")
        if cfg.M > self.config.M:
            fail("M", f"at most the engine's M ({self.config.M})", cfg.M)
        return cfg, stop, stops, logprobs

    def _admit(self) -> List[StepOutput]:
        """FIFO admission at a step boundary: the queue's head joins while a slot
        and its KV reservation are free (no overtaking, so nothing starves).
        The reservation is taken only once the join (the verifier prefill) has
        succeeded: a join that raises leaves the engine as it was; its requests
        are then joined one by one, and those that still fail finish with
        "error" (returned), reserving nothing."""
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
        failed = [(new[0], err)] if len(new) == 1 else \
            [(r, e) for r in new if (e := self._try_join([r])) is not None]
        return [StepOutput(r.request_id, [], 0, True, "error", f"join failed: {type(e).__name__}: {e}")
                for r, e in failed]

    def _try_join(self, new: List[_Request]) -> Optional[Exception]:
        """_join, rolled back if it raises; returns the exception (None: joined
        and reserved)."""
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

    def _truncate(self, n0: int) -> None:
        """Undo a partial join: keep live rows 0 .. n0-1 (nothing was reserved)."""
        self.live = self.live[:n0]
        self.tokens, self.seeds = self.tokens[:n0], self.seeds[:n0]
        self.t, self.total, self.n_prev = self.t[:n0], self.total[:n0], self.n_prev[:n0]
        self.steps, self.W, self.M = self.steps[:n0], self.W[:n0], self.M[:n0]
        self._groups = None
        self.window.live(max(n0, 1))
        if self.ver is not None:
            self.ver.live(max(n0, 1))

    def _join(self, new: List[_Request]) -> None:
        """Append the new requests as rows n0 .. n0+k-1 and prefill the
        verifier's cache with [0, P-1) of each (the dLLM's first step has left =
        0, so it recomputes its whole window and needs no prefill)."""
        dev, n0, k = self.device, len(self.live), len(new)
        prompts = [r.prompt for r in new]
        plens = torch.tensor([p.numel() for p in prompts], dtype=torch.int64)  # [k]
        rows = stack_prompts(prompts, 2 * self.max_len, self.mask_id, dev)  # [k, 2L]
        self.tokens = torch.cat([self.tokens, rows])
        cpu = torch.device("cpu")  # the joiners' seeds cross to the device in one copy
        self.seeds = torch.cat([self.seeds, torch.cat([seed_tensor(r.cfg.seed, 1, cpu) for r in new]).to(dev)])
        self.live.extend(new)
        z = torch.zeros(k, dtype=torch.int64)
        self.t = torch.cat([self.t, plens])
        self.total = torch.cat([self.total, torch.tensor([r.total for r in new], dtype=torch.int64)])
        self.n_prev, self.steps = torch.cat([self.n_prev, z]), torch.cat([self.steps, z])
        self.W = torch.cat([self.W, torch.tensor([-1 if r.cfg.W is None else r.cfg.W for r in new])])
        self.M = torch.cat([self.M, torch.tensor([r.cfg.M for r in new])])
        n = len(self.live)
        self.window.live(n)
        self._groups = None
        if self.ver is None:
            return
        self.ver.live(n)
        pmax = int(plens.max())
        if pmax > 1:  # the verifier's cache holds [0, t-1) before each step
            view = _cache_rows(self.ver.base, n0, n)
            zero = torch.zeros(k, dtype=torch.int64, device=dev)
            with self.timer("verifier"):
                self.verifier.forward(rows[:, : pmax - 1], view, zero, (plens - 1).to(dev),  # q_len 0: 1-token prompts
                                      logit_rows=(zero, 1))
            self.stats.verifier_forwards += 1

    def _compact(self, keep: torch.Tensor) -> None:
        """keep: host [n] bool. The kept rows move to the front of every buffer and cache."""
        for i in (~keep).nonzero().flatten().tolist():
            self.reserved -= self.live[i].total
        self._reorder(keep.nonzero().flatten())

    def _reorder(self, stay: torch.Tensor) -> None:
        """stay: host [m] int64 live rows; they become rows 0 .. m-1 of every
        buffer and cache, in that order (a permutation of all rows keeps every
        request; a subset drops the others, see _compact)."""
        self.live = [self.live[i] for i in stay.tolist()]
        self.t, self.total, self.n_prev = self.t[stay], self.total[stay], self.n_prev[stay]
        self.steps, self.W, self.M = self.steps[stay], self.W[stay], self.M[stay]
        self._groups = None
        n = len(self.live)
        stay_d = stay.to(self.device)
        self.tokens, self.seeds = self.tokens[stay_d], self.seeds[stay_d]
        if n:
            upto = int(self.total.max())  # no cache row extends past its request's total (DESIGN §6 windows)
            compact_cache_(self.window.base, stay_d, upto)
            if self.ver is not None:
                compact_cache_(self.ver.base, stay_d, upto)
        self.window.live(max(n, 1))
        if self.ver is not None:
            self.ver.live(max(n, 1))

    def _row_groups(self, k: int) -> list:
        """Live rows 0 .. k-1 grouped by the ops' scalar knobs: [_Group]; a single
        group (the common case) runs on the whole batch without any gather.
        Cached for k = all live rows (k < n: a dry run of a subset)."""
        if k < len(self.live):
            saved, self._groups, live = self._groups, None, self.live
            self.live = live[:k]
            try:
                return self._row_groups(k)
            finally:
                self.live, self._groups = live, saved
        if self._groups is None:
            by_sig: Dict[tuple, list] = {}
            for i, r in enumerate(self.live):
                by_sig.setdefault(r.signature, []).append(i)
            groups = []
            for rows in by_sig.values():
                r = self.live[rows[0]]
                idx = None if len(by_sig) == 1 else torch.tensor(rows, dtype=torch.int64).to(self.device)
                stop = torch.tensor(r.stop, dtype=torch.int64).to(self.device) if r.stop else None
                groups.append(_Group(r.cfg, stop, idx))
            self._groups = groups
        return self._groups

    @staticmethod
    def _per_group(groups, call) -> torch.Tensor:
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


@dataclass
class _Group:
    cfg: APDConfig  # the group's knobs (its rows share the signature)
    stop_d: Optional[torch.Tensor]  # [E] int64 stop ids on the device, or None
    idx: Optional[torch.Tensor]  # [g] int64 rows on the device; None: every live row


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(name, "an int >= 1", value)


def _cache_rows(cache, a: int, b: int):
    """A KVCache VIEW of sequences a .. b-1 of `cache` (same storage)."""
    from apd_ext.models.cache import KVCache

    view = KVCache.__new__(KVCache)
    view._k, view._v = cache._k[:, a:b], cache._v[:, a:b]  # [layers, b-a, max_len + 1, Hkv, D]
    view.lengths = cache.lengths[a:b]  # [b-a]
    view.batch_size, view.max_len, view.num_layers = b - a, cache.max_len, cache.num_layers
    return view
