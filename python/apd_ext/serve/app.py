"""The HTTP surface: APDServer (one per replica) owns the models, the
tokenizer and a StepLoop over one Engine; make_ingress() wraps it in a
FastAPI app for serve.ingress.

POST /v1/completions, POST /v1/chat/completions (OpenAI schema + R, W, M,
method, top_k, acceptance; SSE when stream is true), GET /v1/models,
GET /health (503 when unhealthy or draining), GET /metrics (Prometheus).
Operations (docs/SERVING.md): a full queue is a 429 with Retry-After, a
draining or unhealthy replica a 503; a request past --request-timeout is a
504 (an error event on a stream), its row freed; a request the Engine fails
alone is a 500 (an error event, finish_reason "error", on a stream).
"""
import asyncio
import logging
import os
import time
import uuid
from typing import List

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from apd_ext.errors import Rejected, RequestFailed
from apd_ext.serve import protocol as P
from apd_ext.serve.loop import StepLoop
from apd_ext.serve.metrics import ServeMetrics


class RequestTimeout(RequestFailed):
    """The request ran past --request-timeout (504)."""


log = logging.getLogger("apd_ext.serve")


class APDServer:
    def __init__(self, dllm_dir: str, verifier_dir: str, *, device: str = "cpu", dtype: str = "auto",
                 max_batch: int = 16, max_len: int = 0, kv_budget: int = 0, M: int = 100, threads: int = 0,
                 model_name: str = "apd", max_queue: int = 0, request_timeout: float = 0.0,
                 loopback: bool = False, prefill_chunk: int = 0, batch_invariant: bool = False):
        import torch

        import apd_ext
        from apd_ext.config import APDConfig
        from apd_ext import Engine
        from apd_ext.tokenization import is_embedded_pair_folder, load_tokenizer

        if loopback:  # a loopback-only `apd serve`: no socket of this replica beyond 127.0.0.1
            from apd_ext.serve.ray_app import pin_replica_grpc_to_loopback

            pin_replica_grpc_to_loopback()
        if threads:
            torch.set_num_threads(threads)
        name = dtype if dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        dt = getattr(torch, name)
        self.dllm = apd_ext.load_model(dllm_dir, dtype=dt, device=device)
        self.verifier = apd_ext.load_model(verifier_dir, dtype=dt, device=device)
        self.tok = load_tokenizer(dllm_dir)
        if is_embedded_pair_folder(dllm_dir):  # its one set of defaults (apd_ext.tiny.DEFAULTS)
            from apd_ext.tiny import apd_config

            base = apd_config(M=min(M, apd_config().M))
        else:
            base = APDConfig(M=M)
        # tokenizer: the Engine's output path detokenizes and checks stop strings
        # inside step(), i.e. in the step loop's worker thread, off the event loop.
        self.engine = Engine(self.dllm, self.verifier, base, max_batch=max_batch,
                             max_len=max_len or None, kv_budget=kv_budget or None, tokenizer=self.tok,
                             prefill_chunk=prefill_chunk or None, batch_invariant=batch_invariant)
        self.metrics = ServeMetrics()
        self.loop = StepLoop(self.engine, max_queue=max_queue, metrics=self.metrics)
        self.request_timeout = request_timeout  # seconds from admission; 0: none
        self.model_name = model_name
        self.started = time.time()

    # ------------------------------------------------------------- routes
    async def health(self):
        e, lp = self.engine, self.loop
        status = "unhealthy" if lp.fatal else "draining" if lp.draining else "ok"
        body = {"status": status, "live": e.num_live, "queued": lp.waiting(), "steps": lp.steps,
                "replica_pid": os.getpid(), "rss_mb": _rss_mb()}
        if lp.fatal:
            body["error"] = lp.fatal
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    def check_health(self):
        """Ray Serve's replica health check: raising makes Serve replace this
        replica (a fatal device error; draining is healthy, it ends by itself)."""
        if self.loop.fatal:
            raise RuntimeError(f"APD replica {os.getpid()} is unhealthy: {self.loop.fatal}")

    async def metrics_text(self):
        self.metrics.queue.set(self.loop.waiting())
        self.metrics.live.set(self.engine.num_live)
        body, ctype = self.metrics.render()
        return Response(body, media_type=ctype)

    async def drain(self, timeout: float) -> dict:
        """Stop admitting (503) and finish the in-flight requests within
        `timeout` seconds (`apd serve` calls it on SIGTERM, through the handle)."""
        out = await self.loop.drain(timeout)
        return dict(out, replica_pid=os.getpid())

    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": int(self.started), "owned_by": "apd-ext"}]}

    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    # ------------------------------------------------------------ helpers
    async def _handle(self, request: Request, chat: bool):
        try:
            body, ignored = P.parse_body(await request.body(), P.CHAT if chat else P.COMPLETIONS)
            if body.get("model", self.model_name) != self.model_name:
                raise P.BadRequest("model", f"expected {self.model_name!r} (see /v1/models), got {body['model']!r}")
            ids = self._encode(body, chat)
            params = P.engine_params(body)
            params.setdefault("max_new_tokens", 16)  # OpenAI's default max_tokens
            if len(ids) < self.engine.max_len < len(ids) + params["max_new_tokens"]:  # (a too long prompt: the Engine's error)
                raise P.BadRequest(P.budget_field(body), f"prompt ({len(ids)} tokens) + {params['max_new_tokens']} "
                                   f"exceeds the model's context of {self.engine.max_len} positions")
            params["stop"] = P.stop_strings(body) or None
            if P.logprobs_k(body) is not None:
                params["logprobs"] = P.logprobs_k(body)
            seed = params.get("seed")
            if seed is None:  # a fresh seed per request, returned so it can be replayed
                seed = P.draw_seed()
            n = body.get("n", 1)
            subs = []
            try:
                for i in range(n):  # choice i: the request with seed + i
                    subs.append(self.loop.submit(ids, dict(params, seed=seed if i == 0 else (seed + i) % 2**64)))
            except (ValueError, TypeError) as e:
                for rid, _ in subs:
                    self.loop.cancel(rid)
                raise P.engine_error(e, body) from None
            except Rejected:
                for rid, _ in subs:  # n > 1: all choices or none
                    self.loop.cancel(rid)
                raise
        except P.BadRequest as e:
            self.metrics.request("bad_request")
            return JSONResponse(e.body(), status_code=400)
        except Rejected as e:
            self.metrics.request(e.reason)
            return JSONResponse({"error": {"message": str(e), "type": "server_busy" if e.status == 429 else
                                           "service_unavailable", "param": None}},
                                status_code=e.status, headers={"Retry-After": str(e.retry_after)})
        headers = {"X-APD-Seed": str(seed)}
        if ignored:
            log.warning("ignored unknown request fields %s", ignored)
            headers["X-APD-Ignored-Fields"] = ",".join(ignored)
        meta = dict(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], created=int(time.time()),
                    model=self.model_name, chat=chat, fingerprint=f"apd-replica-{os.getpid()}",
                    prompt_tokens=len(ids), seed=seed, logprobs=P.logprobs_k(body) is not None,
                    include_usage=bool(body.get("stream_options", {}).get("include_usage", False)),
                    deadline=time.monotonic() + self.request_timeout if self.request_timeout else None)
        if body.get("stream", False):
            return StreamingResponse(self._stream(subs, meta), media_type="text/event-stream", headers=headers)
        out = await self._collect(subs, meta)
        return out if isinstance(out, JSONResponse) else JSONResponse(out, headers=headers)

    def _encode(self, body: dict, chat: bool) -> List[int]:
        if chat:
            msgs = P.chat_messages(body)
            if not getattr(self.tok, "chat_template", None):
                raise P.BadRequest("messages", "this model's tokenizer has no chat template")
            ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            ids = self.tok(P.prompt_text(body), add_special_tokens=False)["input_ids"]
        if not ids:
            raise P.BadRequest("messages" if chat else "prompt", "encodes to no tokens")
        return ids

    async def _next(self, rid, queue, deadline=None):
        """The request's next StepOutput. Raises RequestFailed (its row failed,
        the replica failed or drained) or RequestTimeout (past the deadline:
        the row is freed at the next step boundary)."""
        try:
            if deadline is None:
                item = await queue.get()
            else:
                item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.loop.cancel(rid)
            raise RequestTimeout(f"the request ran past the server's request timeout "
                                 f"({self.request_timeout:g} s)") from None
        except asyncio.CancelledError:
            self.loop.cancel(rid)
            raise
        if isinstance(item, Exception):
            raise item
        if item.finish_reason == "error":
            raise RequestFailed(f"generation failed for this request: {item.error}")
        return item

    def _failure(self, e: RequestFailed) -> tuple:
        """(status label, HTTP status, OpenAI error body) of a failed admitted request."""
        timeout = isinstance(e, RequestTimeout)
        self.metrics.request("timeout" if timeout else "error")
        return (504 if timeout else 500), {"error": {"message": str(e), "type": "timeout" if timeout else
                                                     "server_error", "param": None}}

    async def _one(self, rid, queue, deadline=None):
        """-> (text, finish_reason, tokens accepted per step, logprobs) of one choice;
        raises RequestFailed / RequestTimeout."""
        parts, accepted, lps = [], [], []
        while True:
            o = await self._next(rid, queue, deadline)
            parts.append(o.text)  # the Engine's output path: text deltas, cut before a stop string
            accepted.append(len(o.new_tokens))
            lps += self._token_logprobs(o)
            if o.finished:
                return "".join(parts), o.finish_reason, accepted, lps

    def _token_logprobs(self, o) -> list:
        """[(token id, logprob, [(id, logprob)])] of o's tokens before its first stop id."""
        if o.logprobs is None:
            return []
        out = []
        stop = set(self.engine.default_stop)
        for t, (lp, top) in zip(o.new_tokens, o.logprobs):
            if t in stop:
                break
            out.append((t, lp, top))
        return out

    def _logprobs_obj(self, lps: list, meta):
        """OpenAI's logprobs object (chat: content list; completions: parallel lists),
        None when the request asked for none. Token strings are each id decoded alone."""
        if not meta["logprobs"]:
            return None
        s = lambda t: self.tok.decode([t])  # noqa: E731
        fin = lambda v: v if v != float("-inf") else -9999.0  # noqa: E731  (JSON has no -inf)
        if meta["chat"]:
            return {"content": [{"token": s(t), "logprob": fin(lp), "bytes": list(s(t).encode()),
                                 "top_logprobs": [{"token": s(i), "logprob": fin(v), "bytes": list(s(i).encode())}
                                                  for i, v in top]} for t, lp, top in lps]}
        offs, pos = [], 0
        for t, _, _ in lps:
            offs.append(pos)
            pos += len(s(t))
        return {"tokens": [s(t) for t, _, _ in lps], "token_logprobs": [fin(lp) for _, lp, _ in lps],
                "top_logprobs": [{s(i): fin(v) for i, v in top} for _, _, top in lps], "text_offset": offs}

    def _failure(self, e: RequestFailed) -> tuple:
        """(status label, HTTP status, OpenAI error body) of a failed admitted request."""
        timeout = isinstance(e, RequestTimeout)
        self.metrics.request("timeout" if timeout else "error")
        return (504 if timeout else 500), {"error": {"message": str(e), "type": "timeout" if timeout else
                                                     "server_error", "param": None}}

    async def _collect(self, subs, meta):
        tasks = [asyncio.ensure_future(self._one(rid, q, meta["deadline"])) for rid, q in subs]
        try:
            results = await asyncio.gather(*tasks)
        except RequestFailed as e:  # one choice failed or timed out: the request fails (its other rows freed)
            for (rid, _), t in zip(subs, tasks):
                t.cancel()
                self.loop.cancel(rid)
            status, body = self._failure(e)
            return JSONResponse(body, status_code=status)
        except asyncio.CancelledError:
            self.metrics.request("cancelled")
            raise
        choices, accepted = [], []
        for i, (text, reason, acc, lps) in enumerate(results):
            self.metrics.request(reason)
            c = {"index": i, "finish_reason": reason, "logprobs": self._logprobs_obj(lps, meta)}
            if meta["chat"]:
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["text"] = text
            choices.append(c)
            accepted += acc
        return {"id": meta["id"], "object": "chat.completion" if meta["chat"] else "text_completion",
                "created": meta["created"], "model": meta["model"], "choices": choices,
                "system_fingerprint": meta["fingerprint"], "seed": meta["seed"],
                "usage": P.usage(meta["prompt_tokens"], accepted, len(subs))}

    async def _stream(self, subs, meta):
        """SSE: each choice's text deltas as the Engine's output path produced
        them (complete characters; never text past a stop string), tagged by
        the choice's index; with stream_options.include_usage a last chunk
        with empty choices and the usage."""
        obj = "chat.completion.chunk" if meta["chat"] else "text_completion"
        merged: asyncio.Queue = asyncio.Queue()
        live = {rid for rid, _ in subs}

        async def pump(i, rid, q):
            try:
                while True:
                    o = await self._next(rid, q, meta["deadline"])
                    await merged.put((i, o))
                    if o.finished:
                        live.discard(rid)
                        return
            except RequestFailed as e:
                live.discard(rid)
                await merged.put((i, e))

        def frame(choices, usage=None):
            out = {"id": meta["id"], "object": obj, "created": meta["created"], "model": meta["model"],
                   "system_fingerprint": meta["fingerprint"], "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return P.sse(out)

        def choice(i, delta: str, reason=None, o=None):
            c = {"index": i, "finish_reason": reason,
                 "logprobs": self._logprobs_obj(self._token_logprobs(o), meta) if o is not None else None}
            if meta["chat"]:
                c["delta"] = {"content": delta} if delta or reason is None else {}
            else:
                c["text"] = delta
            return c

        pumps = [asyncio.ensure_future(pump(i, rid, q)) for i, (rid, q) in enumerate(subs)]
        accepted, per_choice, left = [], [[] for _ in subs], len(subs)
        try:
            if meta["chat"]:
                yield frame([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None} for i in range(len(subs))])
            while left:
                i, o = await merged.get()
                if isinstance(o, Exception):
                    _, body = self._failure(o)
                    # This choice's last chunk: finish_reason "error" with the OpenAI error object beside it.
                    c = {"index": i, "finish_reason": "error", "logprobs": None}
                    c.update({"delta": {}} if meta["chat"] else {"text": ""})
                    yield P.sse({
                        "id": meta["id"], "object": obj, "created": meta["created"], "model": meta["model"],
                        "system_fingerprint": meta["fingerprint"], "choices": [c], **body})
                    left -= 1
                    continue
                accepted.append(len(o.new_tokens))
                per_choice[i].append(len(o.new_tokens))
                if o.finished:
                    left -= 1
                    self.metrics.request(o.finish_reason)
                    use = P.usage(meta["prompt_tokens"], per_choice[i])
                    yield frame([choice(i, o.text, o.finish_reason, o)], use if len(subs) == 1 else None)
                elif o.text or o.logprobs:
                    yield frame([choice(i, o.text, None, o)])
            if meta["include_usage"]:
                yield frame([], P.usage(meta["prompt_tokens"], accepted, len(subs)))
            yield b"data: [DONE]\n\n"
        finally:
            for p in pumps:
                p.cancel()
            for rid in list(live):  # the client went away: free the rows still running
                self.metrics.request("cancelled")
                self.loop.cancel(rid)


def _rss_mb() -> float:
    """This process's resident set (Linux /proc), in MiB; -1 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return -1.0


def make_ingress():
    """(app, class) for serve.ingress(app)(class). Built inside a function on
    purpose: Ray Serve rewrites the route methods' signatures in the driver
    (self becomes a dependency) and pickles the app to the replicas; methods
    of an importable module-level class would be pickled by reference and
    arrive without that rewrite, so the routes live on a local subclass."""
    app = FastAPI(title="apd-ext", description="Adaptive Parallel Decoding, OpenAI-style completions")

    class APDIngress(APDServer):
        @app.get("/health")
        async def health(self):
            return await APDServer.health(self)

        @app.get("/metrics")
        async def metrics_text(self):
            return await APDServer.metrics_text(self)

        @app.get("/v1/models")
        async def models(self):
            return await APDServer.models(self)

        @app.post("/v1/completions")
        async def completions(self, request: Request):
            return await APDServer.completions(self, request)

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            return await APDServer.chat_completions(self, request)

    return app, APDIngress
