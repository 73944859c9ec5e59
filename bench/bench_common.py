"""Helpers shared by the per-op benchmark scripts in bench/: the median timer,
the copy-bandwidth floor, number formatting and the final table (printed, and
appended as markdown with --markdown). The scripts run as `python bench/X.py`,
so this directory is on sys.path and they import it as `bench_common`.
"""
from __future__ import annotations

import statistics
import time

import torch


def timer(device, warmup: int, iters: int, budget_s: float | None = None, unit: str = "ms"):
    """fn -> median wall time of fn() in `unit` ("ms" or "us") over `iters` runs after
    `warmup`; CUDA events on the GPU. With budget_s, stops early (after at least 3
    runs) once the timed runs have taken that many seconds."""
    scale = {"ms": 1.0, "us": 1e3}[unit]

    def run(fn):
        for _ in range(warmup):
            fn()
        times, t_all = [], time.perf_counter()
        for _ in range(iters):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * scale)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * (1e3 * scale))
            if budget_s is not None and len(times) >= 3 and time.perf_counter() - t_all > budget_s:
                break
        return statistics.median(times)

    return run


def copy_bandwidth(device, time_fn, nbytes: int, unit_s: float) -> float:
    """Achievable read+write bandwidth (GB/s) of a device copy of `nbytes`, timed
    with time_fn, whose results are in units of `unit_s` seconds."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 4 / (t * unit_s) / 1e9


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def emit_table(title: str, head: list[str], body: list[list[str]], markdown: str | None) -> None:
    """Print the right-aligned table under its title; append it as markdown to `markdown` if given."""
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    print("\n" + title)
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for b in body:
        print("  ".join(c.rjust(w) for c, w in zip(b, widths)))
    if markdown:
        with open(markdown, "a") as f:
            f.write(f"\n**{title}**\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
            for b in body:
                f.write("| " + " | ".join(b) + " |\n")
