"""The Ray Serve deployment of APDServer and the `apd serve` command.

Ray Serve provides the replicas (one Engine each; num_gpus=1 per replica on
GPUs), restarts a replica whose process dies or whose check_health raises
(a fatal device error), routes requests across replicas and runs the HTTP
proxy. `apd serve` starts a local Ray instance (or joins one with --address)
and calls serve.run; it blocks until SIGINT or SIGTERM, then drains (every
replica stops admitting and finishes its in-flight requests within
--drain-timeout) and shuts Serve down.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import List, Optional

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_app(dllm: str, verifier: str, *, replicas: int = 1, device: str = "cpu", dtype: str = "auto",
              max_batch: int = 16, max_len: int = 0, kv_budget: int = 0, M: int = 100, threads: int = 0,
              cpus_per_replica: float = 1.0, model_name: str = "apd", max_queue: int = 0,
              request_timeout: float = 0.0, drain_timeout: float = 30.0, loopback: bool = False,
              prefill_chunk: int = 0, batch_invariant: bool = False):
    """A bound Ray Serve application (pass it to serve.run)."""
    from ray import serve

    from apd_ext.serve.app import make_ingress

    app, cls = make_ingress()
    gpus = 1 if device.startswith("cuda") else 0
    Deployment = serve.deployment(
        name="APDServer", num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus},
        # The Engine queues by itself (max_batch, KV budget) and the replica
        # answers 429 past --max-queue: let Serve hand a replica more than
        # that at once (+ room for /health, /metrics) rather than queue
        # requests in the proxy, where no limit or Retry-After applies.
        max_ongoing_requests=max(4 * max_batch, 64) if not max_queue else max_batch + max_queue + 16,
        health_check_period_s=2, health_check_timeout_s=30,
        # Serve's own graceful stop (serve.delete / replacement) waits as long as our drain.
        graceful_shutdown_timeout_s=max(drain_timeout, 1.0) + 5,
    )(serve.ingress(app)(cls))
    return Deployment.bind(dllm, verifier, device=device, dtype=dtype, max_batch=max_batch, max_len=max_len,
                           kv_budget=kv_budget, M=M, threads=threads, model_name=model_name, max_queue=max_queue,
                           request_timeout=request_timeout, loopback=loopback, prefill_chunk=prefill_chunk,
                           batch_invariant=batch_invariant)


def pin_replica_grpc_to_loopback() -> None:
    """In a Serve replica process: make Serve's inter-deployment gRPC server
    (started after the replica's constructor, ray/serve/_private/replica.py
    _on_initialized) listen on 127.0.0.1 instead of its hard-coded "[::]:0",
    the one socket of a loopback `apd serve` that Ray's node address does not
    govern (Ray 2.60; no option exists). Only for a loopback-only local
    instance, whose node address is 127.0.0.1 anyway, so the server stays
    reachable by everything that could reach it. No-op where Serve differs."""
    try:
        from ray.serve._private import replica as serve_replica
    except ImportError:
        return
    orig = getattr(serve_replica, "add_port_to_grpc_server", None)
    if orig is None or getattr(orig, "apd_loopback", False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address[len("[::]:"):]
        return orig(server, address)

    add_port.apd_loopback = True
    serve_replica.add_port_to_grpc_server = add_port


def add_arguments(p: argparse.ArgumentParser, d_def: Optional[str] = None, a_def: Optional[str] = None) -> None:
    p.add_argument("--dllm", default=d_def, required=d_def is None, help="dLLM checkpoint folder")
    p.add_argument("--verifier", default=a_def, required=a_def is None, help="AR verifier checkpoint folder")
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas (one Engine each; one GPU each on CUDA)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None,
                   help="an existing Ray cluster (e.g. auto, or HOST:6379 after `ray start --head`); "
                   "default: start a local Ray instance")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--max-batch", type=int, default=16, help="live sequences per replica")
    p.add_argument("--max-len", type=int, default=0, help="positions per sequence (0: min(context, 4096))")
    p.add_argument("--kv-budget", type=int, default=0, help="KV positions per replica (0: max-batch x max-len)")
    p.add_argument("--M", type=int, default=100, help="largest lookahead a request may ask for")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="prefill a longer prompt this many tokens per engine step, beside the live rows' "
                   "decode steps (0: off, the whole prompt in its first step; docs/SEMANTICS.md "
                   "'Chunked prefill': chunks change a dLLM's drafts)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="every GEMM once per request, so a request's logits and logprobs are bit-identical "
                   "whatever runs beside it (docs/SEMANTICS.md 'Batch invariance'; slower)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per replica (0: torch's default)")
    p.add_argument("--model-name", default="apd", help="the id /v1/models reports and requests must name")
    p.add_argument("--max-queue", type=int, default=0,
                   help="requests per replica that may wait for a row; beyond, HTTP 429 with Retry-After "
                   "(0: unbounded)")
    p.add_argument("--request-timeout", type=float, default=0.0,
                   help="seconds from admission after which a request is ended (504, or an error event on "
                   "a stream) and its row freed (0: none)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds the replicas get to finish in-flight requests (new ones: 503)")


def _check(args) -> None:
    from apd_ext._validate import check_device
    from apd_ext.errors import UsageError
    from apd_ext.models.config import check_folder

    check_device("--device", args.device)  # here, not in a replica's traceback
    for flag, folder in (("--dllm", args.dllm), ("--verifier", args.verifier)):
        check_folder(flag, folder)
    for flag, v, lo in (("--replicas", args.replicas, 1), ("--port", args.port, 1), ("--max-batch", args.max_batch, 1),
                        ("--M", args.M, 1), ("--max-len", args.max_len, 0), ("--kv-budget", args.kv_budget, 0),
                        ("--max-queue", args.max_queue, 0), ("--prefill-chunk", args.prefill_chunk, 0)):
        if v < lo:
            raise UsageError(f"{flag}: expected an int >= {lo}, got {v}")
    for flag, v in (("--request-timeout", args.request_timeout), ("--drain-timeout", args.drain_timeout)):
        if not v >= 0 or v == float("inf"):
            raise UsageError(f"{flag}: expected seconds >= 0, got {v}")
    if args.port > 65535:
        raise UsageError(f"--port: expected at most 65535, got {args.port}")


def cmd_serve(args) -> int:
    import torch

    _check(args)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    local_only = not args.address and args.host in LOOPBACK
    if local_only:
        # ray.init turns _node_ip_address 127.0.0.1 into the host's external
        # address (services.resolve_ip_for_localhost) unless Ray runs in its
        # single-node mode, where the node address is loopback: then every
        # Ray process (GCS, raylet, workers, agents) binds 127.0.0.1 only.
        # Read when ray is imported, and inherited by the processes it starts.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray import serve

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus or max(2, args.replicas), include_dashboard=False,
                 dashboard_host="127.0.0.1", **({"_node_ip_address": "127.0.0.1"} if local_only else {}))
    # SIGTERM drains from here on, even while the app deploys and its handle
    # warms: ray.init has just installed its own handlers (Python's sys.exit
    # and the core worker's C++ failure handler, which aborts the driver with
    # a stack dump). A SIGTERM that came during start-up, when the replica
    # already answered /health but the driver had not reached its handlers,
    # killed the driver without a drain: new requests then got no 503.
    # A SIGTERM now is acted on once start-up is done (a drain with nothing in
    # flight returns at once). SIGINT keeps Python's KeyboardInterrupt until
    # then, so Ctrl-C still stops a start-up that hangs.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    serve.start(http_options={"host": args.host, "port": args.port})
    handle = serve.run(build_app(args.dllm, args.verifier, replicas=args.replicas, device=device, dtype=args.dtype,
                                 max_batch=args.max_batch, max_len=args.max_len, kv_budget=args.kv_budget, M=args.M,
                                 threads=args.threads, model_name=args.model_name, max_queue=args.max_queue,
                                 request_timeout=args.request_timeout, drain_timeout=args.drain_timeout,
                                 loopback=local_only, prefill_chunk=args.prefill_chunk,
                                 batch_invariant=args.batch_invariant),
                       name="apd", route_prefix="/", blocking=False)
    # Warm the handle now (its router fetches the replicas on first use, which
    # takes seconds on a loaded host): the SIGTERM drain must reach the
    # replicas at once, while their in-flight requests are still running.
    handle.options(method_name="check_health").remote().result(timeout_s=120)
    print(f"apd serve: ready on http://{args.host}:{args.port}/v1 ({args.replicas} replica(s), {device})",
          flush=True)
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    if args.drain_timeout > 0:
        print(f"apd serve: draining ({args.drain_timeout:g} s at most)", flush=True)
        print(f"apd serve: drained {_drain(handle, args.replicas, args.drain_timeout)}", flush=True)
    if args.address:  # someone else's cluster: remove our application, leave the cluster up
        serve.delete("apd")
    # Local instance: ray.shutdown() stops every process it started (the
    # graceful serve.shutdown() can take tens of seconds and adds nothing here).
    ray.shutdown()
    return 0


def _drain(handle, replicas: int, timeout: float) -> dict:
    """Ask every replica to drain (APDServer.drain: stop admitting, finish
    in-flight requests within `timeout`). A handle call reaches one replica
    chosen by Serve's router, so calls go out in rounds until every replica
    has answered (by pid) or the deadline passes; a replica that already
    drained answers at once. Returns {replica pid: its drain result}."""
    seen: dict = {}
    deadline = time.monotonic() + timeout + 10
    while len(seen) < replicas and time.monotonic() < deadline:
        calls = [handle.options(method_name="drain").remote(timeout) for _ in range(4 * replicas)]
        for c in calls:
            try:
                out = c.result(timeout_s=max(1.0, deadline - time.monotonic()))
            except Exception as e:  # noqa: BLE001 (a dead replica cannot drain; go on with the others)
                print(f"apd serve: drain call failed: {type(e).__name__}: {e}", flush=True)
                continue
            seen.setdefault(out["replica_pid"], out)
    return seen


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="apd serve")
    add_arguments(p)
    return cmd_serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
