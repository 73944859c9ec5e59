"""The HTTP surface: APDServer (one per replica) owns the models, the
tokenizer and a StepLoop over one Engine; make_ingress() wraps it in a
FastAPI app for serve.ingress.

POST /v1/completions, POST /v1/chat/completions (OpenAI schema + R, W, M,
method, top_k, acceptance; SSE when stream is true), GET /v1/models, GET /health.
"""
import asyncio
import logging
import os
import time
import uuid
from typing import List

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from apd_ext.serve import protocol as P
from apd_ext.serve.loop import StepLoop

log = logging.getLogger("apd_ext.serve")

class APDServer:
    def __init__(self, dllm_dir: str, verifier_dir: str, *, device: str = "cpu", dtype: str = "auto",
                 max_batch: int = 16, max_len: int = 0, kv_budget: int = 0, M: int = 100, threads: int = 0,
                 model_name: str = "apd"):
        import torch

        import apd_ext
        from apd_ext.config import APDConfig
        from apd_ext.engine import Engine
        from apd_ext.tokenization import is_embedded_pair_folder, load_tokenizer

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
                             max_len=max_len or None, kv_budget=kv_budget or None, tokenizer=self.tok)
        self.loop = StepLoop(self.engine)
        self.model_name = model_name
        self.started = time.time()

    # ------------------------------------------------------------- routes
    async def health(self):
        e = self.engine
        return {"status": "ok", "live": e.num_live, "queued": e.num_queued, "steps": self.loop.steps,
                "replica_pid": os.getpid(), "rss_mb": _rss_mb()}

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
        except P.BadRequest as e:
            return JSONResponse(e.body(), status_code=400)
        headers = {"X-APD-Seed": str(seed)}
        if ignored:
            log.warning("ignored unknown request fields %s", ignored)
            headers["X-APD-Ignored-Fields"] = ",".join(ignored)
        meta = dict(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], created=int(time.time()),
                    model=self.model_name, chat=chat, fingerprint=f"apd-replica-{os.getpid()}",
                    prompt_tokens=len(ids), seed=seed, logprobs=P.logprobs_k(body) is not None,
                    include_usage=bool(body.get("stream_options", {}).get("include_usage", False)))
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

    async def _next(self, rid, queue):
        try:
            item = await queue.get()
        except asyncio.CancelledError:
            self.loop.cancel(rid)
            raise
        if isinstance(item, Exception):
            raise item
        return item

    async def _one(self, rid, queue):
        """-> (text, finish_reason, tokens accepted per step) of one choice."""
        parts, accepted, lps = [], [], []
        while True:
            o = await self._next(rid, queue)
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

    async def _collect(self, subs, meta):
        tasks = [asyncio.ensure_future(self._one(rid, q)) for rid, q in subs]
        try:
            results = await asyncio.gather(*tasks)
        except RuntimeError as e:
            for (rid, _), t in zip(subs, tasks):
                t.cancel()
                self.loop.cancel(rid)
            return JSONResponse({"error": {"message": str(e), "type": "server_error", "param": None}},
                                status_code=500)
        choices, accepted = [], []
        for i, (text, reason, acc, lps) in enumerate(results):
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
                    o = await self._next(rid, q)
                    await merged.put((i, o))
                    if o.finished:
                        live.discard(rid)
                        return
            except RuntimeError as e:
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
                    yield P.sse({"error": {"message": str(o), "type": "server_error", "param": None}})
                    left -= 1
                    continue
                accepted.append(len(o.new_tokens))
                per_choice[i].append(len(o.new_tokens))
                if o.finished:
                    left -= 1
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
            for rid in list(live):
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
