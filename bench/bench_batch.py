"""Batch scaling of APD: ms/step and tokens/s against the batch size B.

Same setup as bench_e2e (apd_ext/decoding/bench.py): random weights, the fixed
acceptance schedule (--accept tokens per step per sequence, through the
benchmarking hook), EOS disabled, (R, W, M) = (0.7, 16, 100). The B prompts
are ragged (lengths P - B/2 .. P + B/2, so the windows differ per sequence).
At B = 1 a step is bound by reading both models' weights; a batch of B reads
them once per step for B sequences, so tokens/s should grow nearly B-fold
until the step turns compute bound.

    python bench/bench_batch.py --device cpu                    # tiny shapes, B <= 8
    python bench/bench_batch.py --device cuda --markdown out.md   # Dream-7B + Qwen2.5-0.5B shapes
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from apd_ext.decoding import bench  # noqa: E402

R, W, M = 0.7, 16, 100


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--shapes", default="auto", choices=("auto", "tiny", "real"),
                    help="auto: real (Dream-7B / Qwen2.5-0.5B, bf16) on CUDA, tiny (fp32) on the CPU")
    ap.add_argument("--batch", default=None,
                    help="comma-separated batch sizes (default 1,2,4,8,16,32 on CUDA, 1,2,4,8 on the CPU)")
    ap.add_argument("--accept", type=int, default=8, help="tokens accepted per step per sequence (fixed schedule)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per generation (default 6 CPU, 16 CUDA)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=None, help="median prompt length (default 64 CPU, 256 CUDA)")
    ap.add_argument("--repeats", type=int, default=None, help="timed generations per row (median; default 3)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also a cuda_graphs=True row per B (CUDA; verifier graphs by batch bucket, dLLM's at B=1)")
    ap.add_argument("--markdown", default=None, help="append the table as markdown to this file")
    args = ap.parse_args(argv)
    args.whole = False
    device, shapes, steps, plen, repeats = bench._resolve(args)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    if args.accept < 1:
        raise SystemExit(f"--accept: expected an int >= 1, got {args.accept}")
    sizes = [int(b) for b in (args.batch or ("1,2,4,8,16,32" if cuda else "1,2,4,8")).split(",")]
    dtype = torch.bfloat16 if cuda else torch.float32
    sd, sa = (bench.DREAM_7B, bench.QWEN_05B) if shapes == "real" else (bench.TINY_DLLM, bench.TINY_AR)

    import apd_ext

    hf_d = bench.build_hf(sd, dtype, device, seed=0)
    hf_a = bench.build_hf(sa, dtype, device, seed=1)
    dllm = apd_ext.load_model(hf_d, kind="dllm", mask_token_id=sd["vocab"] - 1)
    ver = apd_ext.load_model(hf_a, kind="ar")
    bw = bench.copy_bandwidth(device)
    floor_ms = (bench._weight_bytes(hf_d) + bench._weight_bytes(hf_a)) / (bw * 1e9) * 1e3
    g = torch.Generator(device="cpu").manual_seed(0)
    vmax = min(sd["vocab"], sa["vocab"]) - 1
    new = max(args.max_new_tokens, args.accept * steps)
    common = dict(R=R, W=W, M=M, temperature=0.2, top_p=0.95, max_new_tokens=new, seed=0, eos_token_ids=[],
                  _n_accept_override=args.accept, _stop_after_steps=steps)

    rows = []
    runs = [(b, g) for b in sizes for g in ((False, True) if cuda and args.cuda_graphs else (False,))]
    for B, graphs in runs:
        lens = [max(1, plen - B // 2 + i) for i in range(B)]
        prompts = [torch.randint(3, vmax, (n,), generator=g) for n in lens]

        def once():
            o = apd_ext.generate(dllm, ver, prompts, seeds=list(range(B)), cuda_graphs=graphs, **common)
            s = o.stats
            return s.seconds, s.steps, s
        try:
            sec, nsteps, s = bench._median_run(once, repeats)
        except Exception as e:  # noqa: BLE001  (report, keep the other rows; e.g. out of memory)
            print(f"B={B} failed: {type(e).__name__}: {e}", file=sys.stderr)
            if cuda:
                torch.cuda.empty_cache()
            continue
        rows.append(dict(B=B, method="apd+graphs" if graphs else "apd", ms_step=sec / nsteps * 1e3,
                         dllm_ms=s.dllm_seconds / nsteps * 1e3, verifier_ms=s.verifier_seconds / nsteps * 1e3,
                         sampling_ms=s.sampling_seconds / nsteps * 1e3, tokens_per_s=s.generated_tokens / sec))
        print(f"B={B:3d} {rows[-1]['method']:10s} {rows[-1]['ms_step']:9.2f} ms/step "
              f"{rows[-1]['tokens_per_s']:10.1f} tok/s", file=sys.stderr)

    base = next((r for r in rows if r["B"] == 1 and r["method"] == "apd"), None)
    head = ["B", "method", "ms/step", "dLLM ms", "verifier ms", "sampling ms", "tok/s", "tok/s vs B=1",
            "ms/step vs B=1", "x floor"]
    body = []
    for r in rows:
        body.append([str(r["B"]), r["method"], f"{r['ms_step']:.2f}", f"{r['dllm_ms']:.2f}", f"{r['verifier_ms']:.2f}",
                     f"{r['sampling_ms']:.2f}", f"{r['tokens_per_s']:.1f}",
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-",
                     f"{r['ms_step'] / base['ms_step']:.2f}x" if base else "-", f"{r['ms_step'] / floor_ms:.2f}"])
    title = (f"APD batch scaling, {shapes} shapes on {device}, (R, W, M) = ({R}, {W}, {M}), fixed schedule "
             f"{args.accept} tokens/step/sequence, {steps} steps; floor (weights once) {floor_ms:.3f} ms/step")
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    print(title)
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for b in body:
        print("  ".join(c.rjust(w) for c, w in zip(b, widths)))
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"\n### {title}\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
            for b in body:
                f.write("| " + " | ".join(b) + " |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
