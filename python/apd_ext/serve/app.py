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


class APDServer:
    def __init__(self, dllm_dir: str, verifier_dir: str, *, device: str = "cpu", dtype: str = "auto",
                 max_batch: int = 16, max_len: int = 0, kv_budget: int = 0, M: int = 100, threads: int = 0,
                 model_name: str = "apd", max_queue: int = 0, request_timeout: float = 0.0,
                 loopback: bool = False):
        import torch

        import apd_ext
        from apd_ext.config import APDConfig
        from apd_ext.engine import Engine
        from transformers import AutoTokenizer

        if loopback:  # a loopback-only `apd serve`: no socket of this replica beyond 127.0.0.1
            from apd_ext.serve.ray_app import pin_replica_grpc_to_loopback

            pin_replica_grpc_to_loopback()
        if threads:
            torch.set_num_threads(threads)
        name = dtype if dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        dt = getattr(torch, name)
        self.dllm = apd_ext.load_model(dllm_dir, dtype=dt, device=device)
        self.verifier = apd_ext.load_model(verifier_dir, dtype=dt, device=device)
        self.tok = AutoTokenizer.from_pretrained(dllm_dir, local_files_only=True)
        self.engine = Engine(self.dllm, self.verifier, APDConfig(M=M), max_batch=max_batch,
                             max_len=max_len or None, kv_budget=kv_budget or None)
        self.metrics = ServeMetrics()
        self.loop = StepLoop(self.engine, max_queue=max_queue, metrics=self.metrics)
        self.request_timeout = request_timeout  # seconds from admission; 0: none
        self.eos = set(self.engine.default_stop)
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
            body = P.parse_body(await request.body(), P.CHAT if chat else P.COMPLETIONS)
            if body.get("model", self.model_name) != self.model_name:
                raise P.BadRequest("model", f"expected {self.model_name!r} (see /v1/models), got {body['model']!r}")
            ids = self._encode(body, chat)
            params = P.engine_params(body)
            params.setdefault("max_new_tokens", 16)  # OpenAI's default max_tokens
            stop = P.stop_ids(body, self.tok)
            if stop is not None:
                params["stop_token_ids"] = sorted(self.eos) + stop
            try:
                rid, queue = self.loop.submit(ids, params)
            except (ValueError, TypeError) as e:
                raise P.engine_error(e) from None
        except P.BadRequest as e:
            self.metrics.request("bad_request")
            return JSONResponse(e.body(), status_code=400)
        except Rejected as e:
            self.metrics.request(e.reason)
            return JSONResponse({"error": {"message": str(e), "type": "server_busy" if e.status == 429 else
                                           "service_unavailable", "param": None}},
                                status_code=e.status, headers={"Retry-After": str(e.retry_after)})
        meta_deadline = time.monotonic() + self.request_timeout if self.request_timeout else None
        stop_set = self.eos | set(params.get("stop_token_ids", ()))
        meta = dict(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], created=int(time.time()),
                    model=self.model_name, chat=chat, fingerprint=f"apd-replica-{os.getpid()}",
                    prompt_tokens=len(ids), stop=stop_set, deadline=meta_deadline)
        if body.get("stream", False):
            return StreamingResponse(self._stream(rid, queue, meta), media_type="text/event-stream")
        return await self._collect(rid, queue, meta)

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

    async def _collect(self, rid, queue, meta):
        tokens, accepted = [], []
        try:
            while True:
                o = await self._next(rid, queue, meta["deadline"])
                tokens += o.new_tokens
                accepted.append(len(o.new_tokens))
                if o.finished:
                    break
        except RequestFailed as e:
            status, body = self._failure(e)
            return JSONResponse(body, status_code=status)
        except asyncio.CancelledError:
            self.metrics.request("cancelled")
            raise
        self.metrics.request(o.finish_reason)
        body, _ = P.split_finish(tokens, meta["stop"])
        text = self.tok.decode(body, skip_special_tokens=True)
        reason = o.finish_reason
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        if meta["chat"]:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": meta["id"], "object": "chat.completion" if meta["chat"] else "text_completion",
                "created": meta["created"], "model": meta["model"], "choices": [choice],
                "system_fingerprint": meta["fingerprint"],
                "usage": P.usage(meta["prompt_tokens"], accepted)}

    async def _stream(self, rid, queue, meta):
        obj = "chat.completion.chunk" if meta["chat"] else "text_completion"
        ids, text, accepted = [], "", []
        done = False

        def chunk(delta: str, reason=None, usage=None):
            c = {"index": 0, "finish_reason": reason, "logprobs": None}
            if meta["chat"]:
                c["delta"] = {"content": delta} if delta or reason is None else {}
            else:
                c["text"] = delta
            out = {"id": meta["id"], "object": obj, "created": meta["created"], "model": meta["model"],
                   "system_fingerprint": meta["fingerprint"], "choices": [c]}
            if usage is not None:
                out["usage"] = usage
            return P.sse(out)

        try:
            if meta["chat"]:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                         "logprobs": None}
                yield P.sse({"id": meta["id"], "object": obj, "created": meta["created"], "model": meta["model"],
                             "system_fingerprint": meta["fingerprint"], "choices": [first]})
            while not done:
                try:
                    o = await self._next(rid, queue, meta["deadline"])
                except RequestFailed as e:
                    _, body = self._failure(e)
                    # One last chunk: finish_reason "error" with the OpenAI error object beside it.
                    c = {"index": 0, "finish_reason": "error", "logprobs": None}
                    c.update({"delta": {}} if meta["chat"] else {"text": ""})
                    yield P.sse({"id": meta["id"], "object": obj, "created": meta["created"],
                                 "model": meta["model"], "system_fingerprint": meta["fingerprint"],
                                 "choices": [c], **body})
                    done = True
                    break
                accepted.append(len(o.new_tokens))
                body, _ = P.split_finish(o.new_tokens, meta["stop"])
                ids += body
                full = self.tok.decode(ids, skip_special_tokens=True)
                # A longer id list can rewrite the decoded tail (merged bytes):
                # send only what extends the text already sent.
                k = len(text) if full.startswith(text) else 0
                delta, text = full[k:], full
                done = o.finished
                if delta and not done:
                    yield chunk(delta)
                if done:
                    self.metrics.request(o.finish_reason)
                    yield chunk(delta, o.finish_reason, P.usage(meta["prompt_tokens"], accepted))
            yield b"data: [DONE]\n\n"
        finally:
            if not done:
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
