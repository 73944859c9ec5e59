"""The Ray Serve deployment of APDServer and the `apd serve` command.

Ray Serve provides the replicas (one Engine each; num_gpus=1 per replica on
GPUs), restarts a replica whose process dies, routes requests across
replicas and runs the HTTP proxy. `apd serve` starts a local Ray instance
(or joins one with --address) and calls serve.run; it blocks until SIGINT or
SIGTERM, then shuts Serve down.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import List, Optional


def build_app(dllm: str, verifier: str, *, replicas: int = 1, device: str = "cpu", dtype: str = "auto",
              max_batch: int = 16, max_len: int = 0, kv_budget: int = 0, M: int = 100, threads: int = 0,
              cpus_per_replica: float = 1.0, model_name: str = "apd"):
    """A bound Ray Serve application (pass it to serve.run)."""
    from ray import serve

    from apd_ext.serve.app import make_ingress

    app, cls = make_ingress()
    gpus = 1 if device.startswith("cuda") else 0
    Deployment = serve.deployment(
        name="APDServer", num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus},
        # The Engine queues by itself (max_batch, KV budget): let Serve hand a
        # replica many requests at once rather than queue them in the proxy.
        max_ongoing_requests=max(4 * max_batch, 64),
        health_check_period_s=2, health_check_timeout_s=30,
    )(serve.ingress(app)(cls))
    return Deployment.bind(dllm, verifier, device=device, dtype=dtype, max_batch=max_batch, max_len=max_len,
                           kv_budget=kv_budget, M=M, threads=threads, model_name=model_name)


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
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per replica (0: torch's default)")
    p.add_argument("--model-name", default="apd", help="the id /v1/models reports and requests must name")


def _check(args) -> None:
    from apd_ext.cli import UsageError

    from apd_ext._validate import check_device
    from apd_ext.models.config import check_folder

    check_device("--device", args.device)  # here, not in a replica's traceback
    for flag, folder in (("--dllm", args.dllm), ("--verifier", args.verifier)):
        check_folder(flag, folder)
    for flag, v, lo in (("--replicas", args.replicas, 1), ("--port", args.port, 1), ("--max-batch", args.max_batch, 1),
                        ("--M", args.M, 1), ("--max-len", args.max_len, 0), ("--kv-budget", args.kv_budget, 0)):
        if v < lo:
            raise UsageError(f"{flag}: expected an int >= {lo}, got {v}")
    if args.port > 65535:
        raise UsageError(f"--port: expected at most 65535, got {args.port}")


def cmd_serve(args) -> int:
    import torch

    _check(args)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus or max(2, args.replicas), include_dashboard=False,
                 dashboard_host="127.0.0.1")
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(args.dllm, args.verifier, replicas=args.replicas, device=device, dtype=args.dtype,
                        max_batch=args.max_batch, max_len=args.max_len, kv_budget=args.kv_budget, M=args.M,
                        threads=args.threads, model_name=args.model_name),
              name="apd", route_prefix="/", blocking=False)
    print(f"apd serve: ready on http://{args.host}:{args.port}/v1 ({args.replicas} replica(s), {device})",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if args.address:  # someone else's cluster: remove our application, leave the cluster up
        serve.delete("apd")
    # Local instance: ray.shutdown() stops every process it started (the
    # graceful serve.shutdown() can take tens of seconds and adds nothing here).
    ray.shutdown()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="apd serve")
    add_arguments(p)
    return cmd_serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
