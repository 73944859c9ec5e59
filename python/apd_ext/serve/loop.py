"""One Engine driven by an asyncio task: the replica's step loop.

Request handlers never touch the Engine directly (it is not thread-safe and
step() runs in a worker thread so that the event loop keeps serving HTTP):
they validate with Engine.check_request, then post an add / abort command;
the loop applies the commands at the next step boundary, runs one step in a
thread, and pushes each request's StepOutput into that request's
asyncio.Queue. A step that raises fails the requests that were live in it
(each gets the error) and the loop goes on with the rest.
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Dict, List, Optional


class StepLoop:
    def __init__(self, engine):
        self.engine = engine
        self.streams: Dict[str, asyncio.Queue] = {}
        self.commands: List[tuple] = []
        self.wake: Optional[asyncio.Event] = None
        self.task: Optional[asyncio.Task] = None
        self.ids = itertools.count()
        self.steps = 0

    def submit(self, prompt_ids, params: dict) -> tuple:
        """Validate (raises the Engine's ValueError/TypeError) and queue.
        Returns (request_id, queue of StepOutput or Exception)."""
        self.engine.check_request(prompt_ids, params)
        rid = f"r{next(self.ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self.streams[rid] = q
        self.commands.append(("add", rid, prompt_ids, params))
        self._kick()
        return rid, q

    def cancel(self, rid: str) -> None:
        """The client went away: drop the request at the next step boundary."""
        if self.streams.pop(rid, None) is not None:
            self.commands.append(("abort", rid))
            self._kick()

    def _kick(self) -> None:
        if self.task is None or self.task.done():
            self.wake = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._run())
        self.wake.set()

    def _apply(self) -> None:
        cmds, self.commands = self.commands, []
        for cmd in cmds:
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                if rid in self.streams:  # not cancelled in the meantime
                    self.engine.add_request(prompt, params, rid)
            else:
                self.engine.abort(cmd[1])

    async def _run(self) -> None:
        while True:
            self._apply()
            if not self.engine.has_unfinished():
                self.wake.clear()
                await self.wake.wait()
                continue
            live = [r.request_id for r in self.engine.live]
            try:
                outs = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # noqa: BLE001  (a failed step must not end the loop)
                failed = [r.request_id for r in self.engine.live] or live
                for rid in failed:
                    self.engine.abort(rid)
                    q = self.streams.pop(rid, None)
                    if q is not None:
                        q.put_nowait(RuntimeError(f"generation failed: {e}"))
                continue
            self.steps += 1
            for o in outs:
                q = self.streams.get(o.request_id)
                if q is not None:
                    q.put_nowait(o)
                if o.finished:
                    self.streams.pop(o.request_id, None)
