"""Steps saved by stop strings in the Engine's output path, on apd_arith.

lm-eval's `until` strings now end a request at the step that produces one
(before: generation ran to EOS or max_gen_toks and the text was cut after).
This runs the shipped apd_arith problems through the lm-eval model (APDLM,
generate_until, greedy, max_gen_toks 56 as the task) twice, without and with
the stop strings, and reports per-problem steps and generated tokens (median
and spread) and whether the scored answers are unchanged.

    PYTHONPATH=python python bench/bench_stops.py --n 50 --stop '\\n#' --stop '\\n\\n'
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(lm, probs, until):
    from lm_eval.api.instance import Instance

    from apd_ext.tasks import arith

    lm.request_stats = []
    reqs = [Instance(request_type="generate_until", doc={}, idx=i,
                     arguments=(arith.prompt_of(p.question), {"until": list(until), "do_sample": False,
                                                               "max_gen_toks": 56}))
            for i, p in enumerate(probs)]
    texts = lm.generate_until(reqs)
    stats = sorted(lm.request_stats, key=lambda s: s["request"])
    return texts, [s["steps"] for s in stats], [s["generated_tokens"] for s in stats]


def answer(text):
    m = re.search(r"####\s*(-?\d+)", text)
    return m.group(1) if m else None


def spread(xs):
    q = statistics.quantiles(xs, n=4)
    return f"median {statistics.median(xs):.1f} (IQR {q[0]:.1f}-{q[2]:.1f}, min {min(xs)}, max {max(xs)})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50, help="problems (the first n of the shipped test set)")
    ap.add_argument("--stop", action="append", default=None,
                    help="a stop string (Python escapes allowed, e.g. '\\n'); repeatable")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    stops = [s.encode().decode("unicode_escape") for s in (args.stop or ["\\n\\n"])]

    import torch

    from apd_ext import tiny
    from apd_ext.integrations.lm_eval import APDLM
    from apd_ext.tasks import arith

    torch.set_num_threads(1)
    d, a = tiny.paths()
    lm = APDLM(dllm=str(d), verifier=str(a), dtype="float32", device="cpu", R=0.7, W=16, M=56,
               batch_size=args.batch_size)
    probs = arith.load_jsonl(tiny.test_file())[: args.n]
    base_t, base_s, base_g = run(lm, probs, [])
    stop_t, stop_s, stop_g = run(lm, probs, stops)
    cut = [t for t in base_t]
    for s in stops:
        cut = [t.split(s)[0] for t in cut]
    same_answers = sum(answer(x) == answer(y) for x, y in zip(cut, stop_t))
    saved = [b - s for b, s in zip(base_s, stop_s)]
    print(f"apd_arith, {len(probs)} problems, greedy, R=0.7 W=16 M=56, max_gen_toks 56, stops {stops!r}")
    print(f"  steps  without stop: {spread(base_s)}")
    print(f"  steps  with stop:    {spread(stop_s)}")
    print(f"  steps saved:         {spread(saved)}; total {sum(base_s)} -> {sum(stop_s)}")
    print(f"  tokens without/with: {spread(base_g)} / {spread(stop_g)}")
    print(f"  texts equal to the cut-after texts: {sum(x == y for x, y in zip(cut, stop_t))}/{len(probs)}; "
          f"answers equal: {same_answers}/{len(probs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
