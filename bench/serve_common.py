"""Shared by bench_serve.py and bench_serve_faults.py: start `apd serve` on
127.0.0.1 (bounded wait, process-group teardown), the fixed workload of
arithmetic prompts with mixed knobs, and each request's solo answer (the
reference every served response is checked against)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch

import apd_ext
from apd_ext import tiny
from apd_ext.config import APDConfig
from apd_ext.tasks.arith import prompt_of

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHONPATH = os.pathsep.join([os.path.join(HERE, "..", "python")] + [p for p in sys.path if p])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(replicas: int = 1, max_batch: int = 16, start_timeout: float = 180, log_path: str = "/tmp/apd_serve.log",
           extra=()):
    """Yields (base_url, Popen) of `apd serve` with the tiny pair."""
    import httpx

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               PYTHONPATH=PYTHONPATH)
    log = open(log_path, "w+")
    cmd = [sys.executable, "-m", "apd_ext.cli", "serve", "--port", str(port), "--threads", "1",
           "--replicas", str(replicas), "--max-batch", str(max_batch), "--max-len", "256", "--M", "32",
           "--num-cpus", str(max(2, replicas + 1)), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"apd serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"apd serve not healthy after {start_timeout} s (log: {log_path})")
            time.sleep(1)
        yield base, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()


def workload(n: int, seed: int = 0):
    """n request bodies (OpenAI completions + APD fields): test-set questions,
    mixed knobs and budgets, so lengths differ (EOS or budget)."""
    import random

    rng = random.Random(seed)
    with open(tiny.test_file()) as f:
        qs = [json.loads(line)["question"] for _, line in zip(range(200), f)]
    out = []
    for i in range(n):
        out.append(dict(prompt=prompt_of(rng.choice(qs)), max_tokens=rng.choice([16, 32, 64, 96]),
                        temperature=rng.choice([0.0, 0.2, 0.7]), top_p=0.95, seed=rng.randrange(2**32),
                        R=rng.choice([0.5, 0.7, 0.9]), W=rng.choice([4, 16]), M=rng.choice([8, 16, 32])))
    return out


class Solo:
    """Each body's text and token count when generated alone (in process)."""

    def __init__(self, threads: int = 1):
        torch.set_num_threads(threads)
        d, a = tiny.paths()
        self.dllm = apd_ext.load_model(d, dtype=torch.float32)
        self.ver = apd_ext.load_model(a, dtype=torch.float32)
        self.tok = tiny.tokenizer()
        self.eos = set(self.dllm.config.eos_token_ids)

    def config(self, body) -> APDConfig:
        return APDConfig(R=body["R"], W=body["W"], M=body["M"], temperature=body["temperature"], top_p=body["top_p"],
                         seed=body["seed"], max_new_tokens=body["max_tokens"])

    def ids(self, body):
        return self.tok(body["prompt"], add_special_tokens=False)["input_ids"]

    def text(self, tokens) -> str:
        return self.tok.decode([t for t in tokens if t not in self.eos], skip_special_tokens=True)

    def __call__(self, body):
        out = apd_ext.generate(self.dllm, self.ver, [self.ids(body)], self.config(body))
        return self.text(out.generated(0).tolist()), int(out.num_generated[0])


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]
