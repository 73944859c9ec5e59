"""Continuous batching for APD (and its left-to-right baseline): the Engine.

Requests join the live batch at step boundaries (with their prefill) and
leave it as soon as they finish or are aborted. The Engine composes four
rooms, as vLLM v1 has them (docs/ARCHITECTURE.md):

  scheduler  (decoding/scheduler.py) the queue, FIFO admission within the KV
             budget, the live rows' host state, compaction
  runner     (decoding/runner.py) the device rows and caches, the window
             bounds, the dLLM and verifier forwards, the commit on the device
  sampler    (decoding/sampler.py) the draft and the acceptance
  output     (decoding/output.py) StepOutputs: stop ids, stop strings, text,
             logprobs

Batch invariance is the contract (DESIGN §6): a request's tokens depend only
on its prompt and its own parameters, never on what runs beside it or when it
arrived. So every piece of per-request state travels with its row: its own
step counter (the noise is f(seed, step, position), and step 0 is its first
step, whose window starts at 0), its own W / M bounds, seed and budget.

One step = admit (+ the joiners' prefill) -> compute (one dLLM forward, the
draft, one verifier forward, the acceptance) -> ONE host read (n_accept with
the drafts) -> commit (device scatter, outputs, retire the finished).
With prefill_chunk, a joiner's prompt instead rides along the next steps one
chunk at a time (docs/SEMANTICS.md "Chunked prefill"; scheduler.chunks).
"""
from __future__ import annotations

import itertools
from typing import Hashable, List, Optional, Union

import torch

from apd_ext._validate import fail
from apd_ext.config import APDConfig
from apd_ext.decoding import output
from apd_ext.decoding.inputs import check_kind, check_pair, model_device
from apd_ext.decoding.output import StepOutput
from apd_ext.decoding.request import Request, RequestChecker
from apd_ext.decoding.runner import ModelRunner
from apd_ext.decoding.sampler import Sampler
from apd_ext.decoding.scheduler import Scheduler, check_progress
from apd_ext.decoding.stats import GenerationStats, PhaseTimer
from apd_ext.errors import is_fatal
from apd_ext.output.stops import RequestText


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
    prefill_chunk: None (default: a joining request's first step runs its
    whole prompt) or N >= 1: a prompt longer than N is prefilled N tokens per
    engine step, riding along the live rows' decode steps so that a long
    prompt never stalls them; the request drafts from the step after its
    last full chunk (docs/SEMANTICS.md "Chunked prefill": N >= the prompt
    length is exactly the default; W None requests are never chunked).
    batch_invariant: every GEMM of both forwards runs once per request over
    its own rows (models/packing.py Packing.per_request), so a request's
    logits, not only its tokens, are bit-identical alone and in any batch
    (docs/SEMANTICS.md "Batch invariance"); costs a GEMM per request instead
    of one per step (bench/batch_invariance_check.py). Not with cuda_graphs.
    """

    def __init__(self, dllm, verifier, config: Optional[APDConfig] = None, max_batch: int = 8, *,
                 max_len: Optional[int] = None, kv_budget: Optional[int] = None, K: Optional[int] = None,
                 cuda_graphs: bool = False, tokenizer=None, prefill_chunk: Optional[int] = None,
                 batch_invariant: bool = False, _verifier_rows: Optional[int] = None,
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
        if prefill_chunk is not None:
            _check_count("prefill_chunk", prefill_chunk)
        self.prefill_chunk = prefill_chunk
        if not isinstance(batch_invariant, bool):
            raise TypeError(f"batch_invariant: expected a bool, got {type(batch_invariant).__name__}")
        if batch_invariant and cuda_graphs:
            fail("cuda_graphs", "False with batch_invariant=True (a graph replays one GEMM over the padded "
                 "batch bucket; the batch-invariant forwards run one GEMM per request)", cuda_graphs)
        self.batch_invariant = batch_invariant
        self.dllm, self.verifier, self.config, self.K = dllm, verifier, cfg, K
        self.tokenizer = tokenizer
        self.device = model_device(dllm)
        if cuda_graphs and not _graphs_checked and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs: expected models on a CUDA device, got {self.device}")
        models = [dllm] if verifier is None else [dllm, verifier]
        self.context = min(int(m.config.max_position_embeddings) for m in models)
        if max_len is None:
            max_len = min(self.context, 4096)
        _check_count("max_len", max_len)
        if max_len > self.context:
            fail("max_len", f"at most the models' context ({self.context})", max_len)
        if kv_budget is None:
            kv_budget = max_batch * max_len
        _check_count("kv_budget", kv_budget)
        self.max_batch, self.max_len, self.kv_budget = max_batch, max_len, kv_budget
        self.requests = RequestChecker(cfg, dllm, models, self.context, max_len, kv_budget, tokenizer)
        self.default_stop = self.requests.default_stop

        self.stats = GenerationStats()
        self.timer = PhaseTimer(self.device)
        rows = None if verifier is None else (_verifier_rows if _verifier_rows is not None else min(cfg.M, max_len))
        self.runner = ModelRunner(dllm, verifier, max_batch, max_len, cfg.W, cfg.M, verifier_rows=rows,
                                  cuda_graphs=cuda_graphs, timer=self.timer, stats=self.stats,
                                  batch_invariant=batch_invariant)
        self.sampler = Sampler(self.device, self.banned, self.timer)
        self.scheduler = Scheduler(max_batch, kv_budget, self.runner, self.sampler, prefill_chunk)
        self._n_accept_override: Optional[int] = None  # benchmarking hook (bench.py)
        self._trace: Optional[list] = None  # tests only: per step [(request_id, left, right, n_accept)]
        self._ids = itertools.count()

    # ------------------------------------------------------------ requests
    def add_request(self, prompt_ids, params: Union[None, APDConfig, dict] = None,
                    request_id: Optional[Hashable] = None) -> Hashable:
        """Queue a request; returns its id. prompt_ids: a 1-D int tensor or a list
        of ints. params: None (the engine's config), an APDConfig, or a dict of
        APDConfig fields (R, W, M, temperature, top_p, top_k, acceptance, compat,
        seed, max_new_tokens), stop_token_ids (default: the checkpoint's EOS),
        stop (stop strings, with an Engine tokenizer) and logprobs, applied over
        the engine's config. Raises ValueError/TypeError naming the field for
        anything invalid or that can never fit; a request that passes is never
        refused later."""
        req = self.check_request(prompt_ids, params)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if self.scheduler.has(request_id):
            fail("request_id", "an id not already queued or running", repr(request_id))
        req.request_id = request_id
        if self.tokenizer is not None:
            req.text = RequestText(self.tokenizer, req.stops, req.stop)
        self.scheduler.add(req)
        return request_id

    def check_request(self, prompt_ids, params=None) -> Request:
        """add_request's checks without queueing anything (a server validates
        with it before handing the request to its step loop)."""
        return self.requests(prompt_ids, params)

    def abort(self, request_id: Hashable) -> bool:
        """Drop a queued or running request (its slot and KV reservation are
        freed at once). Returns whether it was found."""
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.live) or bool(self.scheduler.queue)

    @property
    def num_live(self) -> int:
        return len(self.scheduler.live)

    @property
    def num_queued(self) -> int:
        return len(self.scheduler.queue)

    @property
    def live(self) -> List[Request]:
        """The live requests, in row order."""
        return self.scheduler.live

    @property
    def reserved(self) -> int:
        """KV positions the live requests reserve together."""
        return self.scheduler.reserved

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
        outs = [StepOutput(r.request_id, [], 0, True, "error", f"join failed: {type(e).__name__}: {e}")
                for r, e in self.scheduler.admit()]
        retried = False
        while True:
            n = self.num_live
            if n == 0:
                return outs
            try:
                res = self._compute(n)
                host = torch.cat([res["n_acc"], res["draft"].reshape(-1)]).cpu()  # the step's one host read
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
        batch = self.runner.prepare(k, *self.scheduler.host_state(k), self.K, self.scheduler.chunks(k))
        d_logits = self.runner.draft_logits(batch)  # [k, rows, V_D]
        draft = self.sampler.draft(d_logits, batch)  # [k, rows]
        a_logits = None if self.verifier is None else self.runner.verify_logits(batch, draft)  # [k, rows, V_A]
        n_acc = self.sampler.accept(d_logits, a_logits, draft, batch)  # [k]
        if self._n_accept_override is not None:  # benchmarking only: a fixed acceptance schedule
            n_acc = torch.minimum(torch.full_like(n_acc, self._n_accept_override), batch.args.rows)
        return dict(batch=batch, draft=draft, n_acc=n_acc, d_logits=d_logits, a_logits=a_logits)

    def _commit(self, n: int, res: dict, host: torch.Tensor) -> List[StepOutput]:
        """Commit the step computed for all n live rows; host: n_accept then the
        drafts, read in the step's one host synchronisation."""
        batch, draft = res["batch"], res["draft"]
        s = self.scheduler
        self.runner.commit(batch, draft, res["n_acc"])
        n_h = host[:n]  # [n]
        d_host = host[n:].view(n, batch.rows)  # [n, rows]
        bad = output.bad_rows(d_host, batch.rows_t)  # [n] bool: those requests fail, alone
        pre = batch.pre  # [n] bool: prefilling rows drafted nothing (no output, no step)
        good = (~bad & ~pre).nonzero().flatten()
        self._inspect(batch.left[good], batch.right[good], n_h[good], good.tolist())
        want = [i for i, r in enumerate(self.live) if r.logprobs is not None and not bool(bad[i] | pre[i])]
        lps = output.logprobs(self.live, want, res["d_logits"], res["a_logits"], draft) if want else {}
        outs, done = output.step_outputs(self.live, s.steps, s.t, s.total, n_h, d_host, batch.rows_t, bad, lps, pre)
        self.stats.steps += 1
        s.advance(n_h, pre)
        if bool(done.any()):
            s.retire(~done)
        return outs

    def _isolate(self, err: Exception) -> dict:
        """The step raised `err` over the live rows: bisect them with dry runs
        (_compute on a subset moved to the front) down to the single requests
        that raise alone. Returns {id(request): (request, its exception)};
        empty when no subset reproduces the failure."""
        culprits: dict = {}
        n = self.num_live

        def probe(group: list):
            ids = {id(r) for r in group}
            order = [i for i, r in enumerate(self.live) if id(r) in ids]
            order += [i for i, r in enumerate(self.live) if id(r) not in ids]
            self.scheduler.reorder(torch.tensor(order, dtype=torch.int64))
            self.runner.live(len(group))
            try:
                res = self._compute(len(group))
                res["draft"].cpu()  # surface an asynchronous device error here
                return None
            except Exception as e:  # noqa: BLE001
                if is_fatal(e):
                    raise
                return e
            finally:
                self.runner.live(n)

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
                for r, s in zip(self.live, self.scheduler.steps.tolist()) if id(r) in drop]
        self.scheduler.retire(keep)
        return outs

    def _inspect(self, left: torch.Tensor, right: torch.Tensor, n_accept: torch.Tensor, rows: list) -> None:
        """The per-step checkpoint right after the host read, before anything
        is retired: left / right / n_accept are host [m] int64 for the rows
        `rows` of self.live that drafted (every row but the non-finite ones;
        the scheduler's steps still hold each row's 0-based step). The place for
        invariant checks (e.g. a live row that accepted nothing) and trace hooks."""
        live = [self.live[i] for i in rows]
        s = self.scheduler
        check_progress(s.steps[rows], s.t[rows], n_accept, [r.request_id for r in live])
        if self._trace is not None:  # tests only: per-step window bounds and acceptance
            self._trace.append([(r.request_id, int(lo), int(hi), int(k))
                                for r, lo, hi, k in zip(live, left, right, n_accept)])

    def finish_all(self) -> List[StepOutput]:
        """Retire every live request as it stands ("length"); the queue stays.
        (Used by the benchmarks' fixed step counts.)"""
        outs = [StepOutput(r.request_id, [], int(s), True, "length")
                for r, s in zip(self.live, self.scheduler.steps.tolist())]
        if self.live:
            self.scheduler.retire(torch.zeros(self.num_live, dtype=torch.bool))
        return outs


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(name, "an int >= 1", value)
