"""The replica's Prometheus metrics (prometheus_client), served by GET /metrics
in the text exposition format.

Each replica owns a CollectorRegistry (not the process-global one): two
servers in one process (tests) do not collide, and one scrape reads one
replica. Every series carries a `replica` label (the process id, as the
responses' system_fingerprint), so scrapes of several replicas through the
proxy can be told apart and summed.
"""
from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Buckets: the CPU tiny pair steps in ~10-100 ms, a GPU 7B pair in ~10-50 ms;
# blocks are 1 .. M (<= 100) tokens.
_SECONDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 100)
_ROWS_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

STATUSES = ("stop", "length", "error", "timeout", "cancelled", "rejected_queue_full", "rejected_draining",
            "rejected_unhealthy", "bad_request")


class ServeMetrics:
    def __init__(self, replica: str = None):
        self.registry = CollectorRegistry()
        rep = replica if replica is not None else str(os.getpid())
        kw = dict(registry=self.registry, labelnames=("replica",))
        self._requests = Counter("apd_requests", "Requests by final status (stop / length: completed; error, "
                                 "timeout, cancelled; rejected_*: refused at admission; bad_request: 400)",
                                 labelnames=("replica", "status"), registry=self.registry)
        self.queue = Gauge("apd_queue_length", "Requests admitted and waiting for a row", **kw).labels(rep)
        self.live = Gauge("apd_live_rows", "Requests live in the batch (rows)", **kw).labels(rep)
        self.healthy = Gauge("apd_healthy", "1 while the replica's device is usable, 0 after a fatal error",
                             **kw).labels(rep)
        self.draining = Gauge("apd_draining", "1 once the replica stopped admitting (SIGTERM drain)",
                              **kw).labels(rep)
        self.step_seconds = Histogram("apd_step_seconds", "Wall time of one Engine step (admission, both "
                                      "forwards, sampling, commit)", buckets=_SECONDS, **kw).labels(rep)
        self.tokens_per_forward = Histogram("apd_tokens_per_dllm_forward", "Tokens committed over all rows "
                                            "by one step (one batched dLLM forward)", buckets=_ROWS_TOKENS,
                                            **kw).labels(rep)
        self.block = Histogram("apd_accepted_block_length", "Tokens a request accepted in one step",
                               buckets=_TOKENS, **kw).labels(rep)
        self.ttfb = Histogram("apd_time_to_first_block_seconds", "From admission to a request's first "
                              "accepted block", buckets=_SECONDS, **kw).labels(rep)
        self.steps = Counter("apd_steps", "Engine steps run", **kw).labels(rep)
        self.healthy.set(1)
        self.draining.set(0)
        self._rep = rep
        for s in STATUSES:  # every status appears from the first scrape (rate() needs the zero)
            self._requests.labels(rep, s)

    def request(self, status: str) -> None:
        self._requests.labels(self._rep, status).inc()

    def render(self) -> tuple:
        """(body bytes, content type) of the text exposition format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
