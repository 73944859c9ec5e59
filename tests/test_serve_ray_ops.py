"""`apd serve` on Ray with a loopback --host (one server for the module, on
127.0.0.1; Ray's start is slow on 2 cores, so the checks share it):

- no listening socket of the server's process tree (driver, GCS, raylet,
  workers, agents, Serve's proxy and replicas) is on a non-loopback address,
  read with `ss -ltnp` (or /proc/net/tcp{,6} where ss is missing);
- --max-queue through the proxy: the excess of a burst is 429 with
  Retry-After, every admitted request completes; /metrics counts both;
- SIGTERM drains: the in-flight stream completes, new requests get 503, and
  the process exits; a SIGTERM during start-up drains once start-up is done.
The servers start through tests/serve_utils.py (ready = the driver's "ready"
line, not the replica's /health).
"""
import asyncio
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from apd_ext import tiny
from serve_utils import READY, apd_serve, wait_for_line

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")

MAX_BATCH, MAX_QUEUE = 2, 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d, a = tiny.paths()
    log = tmp_path_factory.mktemp("serve_ops") / "serve.log"
    with apd_serve(d, a, log, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--max-len", "256",
                   "--M", "32", "--drain-timeout", "60") as out:
        yield out


def _tree(root: int) -> set:
    """root and its descendants (Linux /proc)."""
    parent = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in out} - out
        out |= new
        grew = bool(new)
    return out


def _listening(pids: set) -> list:
    """[(address, pid)] of the TCP sockets in LISTEN state owned by pids."""
    if shutil.which("ss"):
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30).stdout
        res = []
        for line in out.splitlines():
            cols = line.split()
            local = cols[3]
            for part in line.split("pid=")[1:]:
                pid = int(part.split(",")[0])
                if pid in pids:
                    res.append((local, pid))
        return res
    # No ss: /proc/net/tcp{,6} (state 0A = LISTEN), sockets matched to pids by inode.
    inode_pid = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inode_pid[link[8:-1]] = pid
        except OSError:
            pass
    res = []
    for name in ("tcp", "tcp6"):
        with open(f"/proc/net/{name}") as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inode_pid:
                    hexaddr = cols[1].split(":")[0]
                    if name == "tcp":
                        addr = ".".join(str(int(hexaddr[i:i + 2], 16)) for i in (6, 4, 2, 0))
                    else:
                        addr = "::1" if hexaddr == "0" * 31 + "1" or hexaddr.endswith("0100007F") and \
                            hexaddr.startswith("0000000000000000FFFF0000") else hexaddr
                    res.append((addr + ":" + str(int(cols[1].split(":")[1], 16)), inode_pid[cols[9]]))
    return res


def _loopback(local: str) -> bool:
    host = local.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1", "localhost")


def test_no_port_of_the_server_listens_beyond_loopback(server):
    base, proc, _ = server
    socks = _listening(_tree(proc.pid))
    port = base.rsplit(":", 1)[1]
    assert any(local.endswith(":" + port) for local, _ in socks), socks  # the HTTP proxy was seen
    assert len({pid for _, pid in socks}) >= 4, socks  # GCS, raylet, workers ... were seen
    wide = [(local, pid) for local, pid in socks if not _loopback(local)]
    assert not wide, f"listening beyond loopback: {wide}"


def _body(i, **kw):
    return dict(dict(prompt=f"Question: Sam has {i + 3} pencils. He loses 2 pencils. How many pencils does Sam "
                     "have now?\nAnswer:\n", max_tokens=64, temperature=0.7, seed=i), **kw)


def test_burst_beyond_the_queue_is_429_and_metrics_count_it(server):
    base = server[0]

    async def go():
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            # M 1: ~28 steps each, so the admitted ones hold their rows while the burst arrives
            return await asyncio.gather(*(http.post("/v1/completions", json=_body(i, M=1))
                                          for i in range(2 * (MAX_BATCH + MAX_QUEUE))))

    res = asyncio.run(asyncio.wait_for(go(), 300))
    ok = [r for r in res if r.status_code == 200]
    busy = [r for r in res if r.status_code == 429]
    assert len(ok) + len(busy) == len(res) and len(ok) >= MAX_BATCH + MAX_QUEUE and busy, \
        [r.status_code for r in res]
    assert all(int(r.headers["retry-after"]) >= 1 for r in busy)
    assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in ok)
    text = httpx.get(base + "/metrics", timeout=30).text
    from prometheus_client.parser import text_string_to_metric_families

    by = {s.labels["status"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
          if s.name == "apd_requests_total"}
    assert by["rejected_queue_full"] == len(busy)
    assert by["stop"] + by["length"] == len(ok)


def test_sigterm_drains_in_flight_and_refuses_new(server):
    base, proc, log = server
    # M 1: one token per step, so its ~28 tokens take ~28 steps (seconds here):
    # still in flight when the drain reaches the replica
    long = _body(7, max_tokens=200, M=1, stream=True, prompt=(
        "Question: Sam has 10 pencils. He loses 2 pencils. He buys 7 pencils. He gives away 3 pencils. "
        "He finds 5 pencils. How many pencils does Sam have now?\nAnswer:\n"))  # four events: a long answer
    with httpx.Client(base_url=base, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=long) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert "error" not in json.loads(first[6:])
            proc.send_signal(signal.SIGTERM)  # the driver only: it drains the replicas, then shuts Ray down
            refused, deadline = None, time.monotonic() + 30
            while refused is None and time.monotonic() < deadline:  # the stream stays open meanwhile
                try:
                    resp = httpx.post(base + "/v1/completions", json=_body(8, max_tokens=4), timeout=30)
                except httpx.HTTPError:  # shutting down already: keep trying until the deadline
                    time.sleep(0.05)
                    continue
                if resp.status_code == 503:
                    refused = resp
            rest = [x for x in lines if x]
            assert rest and rest[-1] == "data: [DONE]" and not any('"error"' in x for x in rest), rest[-3:]
    assert refused is not None and "draining" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert proc.wait(timeout=120) == 0
    log.seek(0)
    out = log.read()
    assert "apd serve: drained {" in out and "'failed': 0" in out, out[-2000:]


def test_sigterm_during_start_up_drains_once_ready(tmp_path):
    """A SIGTERM that reaches the driver while the app is still deploying (the
    window in which the replica may already answer /health) is not lost and
    does not kill the driver (ray.init's own handlers abort it with a stack
    dump): start-up completes, the drain runs, the process exits 0."""
    d, a = tiny.paths()
    with apd_serve(d, a, tmp_path / "serve.log", "--max-len", "256", "--M", "32", "--drain-timeout", "5",
                   wait_ready=False) as (_, proc, log):
        wait_for_line(proc, log, "Started Serve in namespace")  # serve.start() returned: past ray.init
        proc.send_signal(signal.SIGTERM)
        log.seek(0)
        assert READY not in log.read()  # still deploying (the replica loads its models: seconds)
        assert proc.wait(timeout=180) == 0
        log.seek(0)
        out = log.read()
    assert "SIGTERM received" not in out, out[-3000:]
    assert out.index(READY) < out.index("apd serve: drained {"), out[-3000:]
