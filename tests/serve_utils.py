"""`apd serve` as a subprocess for a test module (tests/test_serve.py,
tests/test_serve_ray_ops.py): one helper, so that both start, wait and tear
down the same way.

Ready means the driver printed "apd serve: ready on ...": by then the app is
deployed, the driver's handle is warm and its SIGTERM drain is armed. /health
alone is not enough: the replica answers it while the driver is still
warming its handle, and a test that signals the driver then tests start-up,
not the drain. The server runs in its own session (process group) with
Ray's processes, so teardown (SIGTERM to the group, then SIGKILL after a
bounded wait) leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

START_TIMEOUT = 180  # seconds: Ray's start on a loaded 2-core machine
READY = "apd serve: ready on "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_text(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


def wait_for_line(proc, log, text: str, timeout: float = START_TIMEOUT) -> None:
    """Wait until the server's log holds `text` (fails if the server exits or the time runs out)."""
    deadline = time.monotonic() + timeout
    while text not in _log_text(log):
        if proc.poll() is not None:
            pytest.fail(f"apd serve exited with {proc.returncode} before {text!r}:\n{_log_text(log)[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"apd serve: no {text!r} after {timeout:g} s:\n{_log_text(log)[-3000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def apd_serve(dllm: str, verifier: str, log_path, *args: str, start_timeout: float = START_TIMEOUT,
              wait_ready: bool = True):
    """Start `apd serve --dllm D --verifier A --host 127.0.0.1 --port P --threads 1
    --num-cpus 2 <args>` and yield (base_url, proc, log) once it is ready (at
    once with wait_ready=False); log is the server's stdout + stderr (a file
    open for reading too)."""
    import httpx

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "apd_ext.cli", "serve", "--dllm", str(dllm), "--verifier", str(verifier),
         "--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--num-cpus", "2", *args],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        if wait_ready:
            wait_for_line(proc, log, READY, start_timeout)
            r = httpx.get(base + "/health", timeout=30)
            assert r.status_code == 200, r.text
        yield base, proc, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's workers share the group
        proc.wait(timeout=10)
        log.close()
