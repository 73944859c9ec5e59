"""One Engine driven by an asyncio task: the replica's step loop.

Request handlers never touch the Engine directly (it is not thread-safe and
step() runs in a worker thread so that the event loop keeps serving HTTP):
they validate with Engine.check_request, then post an add / abort command;
the loop applies the commands at the next step boundary, runs one step in a
thread, and pushes each request's StepOutput into that request's
asyncio.Queue (an Exception instead when the request cannot go on).

Failures (docs/SERVING.md, "Operations"):
- a request the Engine fails alone (non-finite row, a step or join that
  raises for it) arrives as a StepOutput with finish_reason "error";
- an exception that escapes Engine.step anyway fails the requests live in that
  step, and the loop goes on (it survives any exception);
- a fatal device error (errors.is_fatal) marks the loop dead: every admitted
  request gets a RequestFailed at once (never a hang), new ones are refused
  (503), and the replica's check_health raises so Ray Serve replaces it.

Admission: at most max_queue requests wait for a row (engine queue + adds not
yet applied); beyond that submit raises Rejected(429). Once draining, or
dead, submit raises Rejected(503).
"""
from __future__ import annotations

import asyncio
import itertools
import time
from typing import Dict, List, Optional

from apd_ext.errors import Rejected, RequestFailed, is_fatal


class StepLoop:
    def __init__(self, engine, *, max_queue: int = 0, metrics=None):
        self.engine = engine
        self.max_queue = max_queue  # 0: unbounded
        self.metrics = metrics  # serve.metrics.ServeMetrics or None
        self.streams: Dict[str, asyncio.Queue] = {}
        self.commands: List[tuple] = []
        self.wake: Optional[asyncio.Event] = None
        self.task: Optional[asyncio.Task] = None
        self.ids = itertools.count()
        self.steps = 0
        self.step_time = 0.0  # seconds spent in Engine.step, all steps
        self.finished, self.finished_steps = 0, 0  # requests that finished, and their steps together
        self.fatal: Optional[str] = None  # the fatal error, once the device is unusable
        self.draining = False
        self.admitted_at: Dict[str, float] = {}  # rid -> monotonic admission time, until its first block

    # ---------------------------------------------------------- admission
    def waiting(self) -> int:
        """Admitted requests that will wait for a row: the engine's queue and
        the adds not yet applied, less the rows free now."""
        pending = self.engine.num_queued + sum(1 for c in self.commands if c[0] == "add")
        return max(0, pending - (self.engine.max_batch - self.engine.num_live))

    def submit(self, prompt_ids, params: dict) -> tuple:
        """Validate (raises the Engine's ValueError/TypeError), check admission
        (raises Rejected) and queue. Returns (request_id, queue of StepOutput
        or Exception)."""
        if self.fatal is not None:
            raise Rejected(f"this replica is unhealthy ({self.fatal}); it is being replaced", 503,
                           "rejected_unhealthy", retry_after=5)
        if self.draining:
            raise Rejected("this replica is shutting down (draining); retry on another", 503, "rejected_draining")
        self.engine.check_request(prompt_ids, params)
        if self.max_queue and self.waiting() >= self.max_queue:
            raise Rejected(f"the queue is full ({self.max_queue} requests waiting for a row)", 429,
                           "rejected_queue_full", retry_after=self._retry_after())
        rid = f"r{next(self.ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self.streams[rid] = q
        self.admitted_at[rid] = time.monotonic()
        self.commands.append(("add", rid, prompt_ids, params))
        self._kick()
        return rid, q

    def _retry_after(self) -> int:
        """Seconds until the queue ahead has drained at the recent pace: each
        waiting request holds a row for the mean steps of a finished request,
        max_batch rows run at once, a step takes the mean step time."""
        if self.steps == 0 or self.finished == 0:
            return 1
        per_req = self.step_time / self.steps * self.finished_steps / self.finished
        return max(1, int(per_req * self.waiting() / max(1, self.engine.max_batch) + 0.999))

    def cancel(self, rid: str) -> None:
        """The client went away (or timed out): drop the request at the next step boundary."""
        self.admitted_at.pop(rid, None)
        if self.streams.pop(rid, None) is not None:
            self.commands.append(("abort", rid))
            self._kick()

    def in_flight(self) -> int:
        return len(self.streams)

    async def drain(self, timeout: float) -> dict:
        """Stop admitting (submit raises Rejected 503) and wait until every
        admitted request has finished, for `timeout` seconds at most; those
        still running then get RequestFailed. Returns {"finished", "failed"}."""
        self.draining = True
        if self.metrics is not None:
            self.metrics.draining.set(1)
        before = len(self.streams)
        deadline = time.monotonic() + timeout
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.streams)
        for rid in left:
            self._fail(rid, RequestFailed(f"the server shut down before this request finished "
                                          f"(drain deadline {timeout:g} s)"))
        return {"finished": before - len(left), "failed": len(left)}

    # ---------------------------------------------------------------- loop
    def _kick(self) -> None:
        if self.fatal is not None:
            return
        if self.task is None or self.task.done():
            self.wake = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._run())
        self.wake.set()

    def _fail(self, rid: str, exc: Exception) -> None:
        self.admitted_at.pop(rid, None)
        q = self.streams.pop(rid, None)
        if q is not None:
            q.put_nowait(exc)
        if self.fatal is None:
            self.commands.append(("abort", rid))

    def _apply(self) -> None:
        cmds, self.commands = self.commands, []
        for cmd in cmds:
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                if rid in self.streams:  # not cancelled in the meantime
                    try:
                        self.engine.add_request(prompt, params, rid)
                    except Exception as e:  # noqa: BLE001 (checked at submit; fail only this one)
                        self._fail(rid, RequestFailed(f"could not queue the request: {e}"))
            else:
                self.engine.abort(cmd[1])

    def _die(self, e: BaseException) -> None:
        """A fatal device error: fail every admitted request now; admit nothing more."""
        self.fatal = f"{type(e).__name__}: {e}"
        if self.metrics is not None:
            self.metrics.healthy.set(0)
        for rid in list(self.streams):
            self._fail(rid, RequestFailed(f"the replica's device failed: {self.fatal}"))
        self.commands = []

    async def _run(self) -> None:
        while self.fatal is None:
            try:
                self._apply()
                if not self.engine.has_unfinished():
                    self._gauges()
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                await self._step()
            except Exception as e:  # noqa: BLE001 (the loop survives any exception)
                if is_fatal(e):
                    self._die(e)
                    return
                # Escaped the Engine's per-request containment (a bug, not a
                # request's fault): fail what was live in that step, go on.
                for r in list(self.engine.live):
                    self._fail(r.request_id, RequestFailed(f"generation failed: {type(e).__name__}: {e}"))
                try:
                    self._apply()
                except Exception as e2:  # noqa: BLE001 (the engine cannot even drop rows: unusable)
                    self._die(e2)
                    return

    async def _step(self) -> None:
        t0 = time.monotonic()
        outs = await asyncio.to_thread(self.engine.step)
        now = time.monotonic()
        self.steps += 1
        self.step_time += now - t0
        m = self.metrics
        if m is not None:
            m.step_seconds.observe(now - t0)
            m.steps.inc()
            done = [o for o in outs if o.finish_reason != "error"]
            if done:
                m.tokens_per_forward.observe(sum(len(o.new_tokens) for o in done))
            for o in done:
                if o.new_tokens:
                    m.block.observe(len(o.new_tokens))
        for o in outs:
            t_adm = self.admitted_at.pop(o.request_id, None) if o.new_tokens else None
            if t_adm is not None and m is not None:
                m.ttfb.observe(now - t_adm)
            q = self.streams.get(o.request_id)
            if q is not None:
                q.put_nowait(o)
            if o.finished:
                self.finished += 1
                self.finished_steps += o.step
                self.streams.pop(o.request_id, None)
                self.admitted_at.pop(o.request_id, None)
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.live.set(self.engine.num_live)
            self.metrics.queue.set(self.waiting())
