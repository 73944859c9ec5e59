"""Batch invariance on a device (DESIGN.md §8, docs/SEMANTICS.md "Batch
invariance"): a request alone and the same request inside mixed batches, and
whether its outputs are bit-identical. A check, not a benchmark:
bench/gpu_check.sh runs it when a GPU is lent (issue 30).

    python bench/batch_invariance_check.py --device cuda [--markdown out.md]

Rows:
  * window_attention (simple and mma kernels, bf16; simple fp32): a request's
    output rows alone (B = 1, Lq = its q_len, Lmax = its kv_len) against
    batches with longer / shorter windows and caches around it. Invariant by
    construction (attention_split.h); the emulated test is
    tests/test_attention_cuda.py::test_batch_invariance.
  * sample_draft / mixture_accept: a request's ids and n_accept alone against
    batches with M padded to a longer window. Invariant by construction (one
    CTA per row); emulated: tests/test_sampling_cuda.py.
  * the shipped tiny pair (fp32 and bf16): the dLLM's and the verifier's
    prompt logits of a request alone against a batch of three prompts, and
    generate's tokens (temperature 0.7, own seeds) alone against the batch.
    These go through the models' GEMMs (cuBLAS on CUDA, MKL / oneDNN on the
    CPU), whose kernel choice may depend on the row count: with one GEMM per
    step NOT invariant (the measurement), with the per-request plan
    (Engine(batch_invariant=True): one GEMM per request) invariant by
    construction.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from bench_common import emit_table  # noqa: E402

import apd_ext  # noqa: E402
from apd_ext import ops, tiny  # noqa: E402
from apd_ext.models import Packing  # noqa: E402

# (q_len, kv_len, q_start) of the requests; the first two are checked, the
# others are batch-mates (a long window and the longest cache among them).
ATTN_REQS = [(5, 300, 295), (3, 1000, 997), (64, 1200, 1136), (1, 64, 63), (0, 10, 0), (150, 400, 250)]
ATTN_BATCHES = [(0, [2]), (1, [3, 5]), (2, [2, 4, 0, 1]), (1, [5, 2, 3, 4])]  # (position, mates; the other tracked one too)


def _diff(x: torch.Tensor, y: torch.Tensor) -> tuple[bool, float]:
    same = x.shape == y.shape and torch.equal(x, y)
    if same or x.shape != y.shape:
        return same, 0.0 if same else float("inf")
    return False, (x.double() - y.double()).abs().max().item()


def check_attention(dev: str, dtype: torch.dtype, impl: str, causal: bool) -> tuple[bool, str]:
    os.environ["APD_ATTN_IMPL"] = impl  # read at every call (ops_cuda_attention.cpp)
    Hq, Hkv, D = 28, 4, 128  # Dream-7B's heads
    g = torch.Generator().manual_seed(0)
    own = [(torch.randn(ql, Hq, D, generator=g).to(dtype), torch.randn(kl, Hkv, D, generator=g).to(dtype),
            torch.randn(kl, Hkv, D, generator=g).to(dtype)) for ql, kl, _ in ATTN_REQS]

    def run(idx):
        B = len(idx)
        Lq = max(1, max(ATTN_REQS[i][0] for i in idx))
        Lmax = max(ATTN_REQS[i][1] for i in idx) + 16 * (B - 1)
        q = (torch.randn(B, Lq, Hq, D, generator=g) * 5).to(dtype)
        k = (torch.randn(B, Lmax, Hkv, D, generator=g) * 5).to(dtype)
        v = (torch.randn(B, Lmax, Hkv, D, generator=g) * 5).to(dtype)
        for b, i in enumerate(idx):
            ql, kl, _ = ATTN_REQS[i]
            q[b, :ql], k[b, :kl], v[b, :kl] = own[i]
        lens = [torch.tensor([ATTN_REQS[i][j] for i in idx], device=dev) for j in (2, 0, 1)]
        out = ops.window_attention(q.to(dev), k.to(dev), v.to(dev), *lens, causal=causal)
        return out.cpu()

    worst, n, bad = 0.0, 0, 0
    for t in (0, 1):
        alone = run([t])[0, : ATTN_REQS[t][0]]
        for pos, mates in ATTN_BATCHES:
            idx = [m for m in mates if m != t]
            idx.insert(min(pos, len(idx)), t)
            out = run(idx)[idx.index(t), : ATTN_REQS[t][0]]
            same, d = _diff(out, alone)
            n, bad, worst = n + 1, bad + (not same), max(worst, d)
    return bad == 0, f"{n - bad}/{n} batches identical, max |diff| {worst:.3g}"


def check_sampling(dev: str) -> tuple[bool, str]:
    V_D, V_A = 32768, 32000
    reqs = [(3, 17, 11, 5), (6, 200, -7, 2**33), (1, 0, 3, 0), (0, 9, 4, 1), (9, 3000, 2**61, 77)]
    g = torch.Generator().manual_seed(1)
    own = [(torch.randn(m, V_D, generator=g) * 3, torch.randn(m, V_A, generator=g) * 3,
            torch.randint(0, V_A, (m,), generator=g)) for m, *_ in reqs]

    def run(idx, slack):
        B, M = len(idx), max(1, max(reqs[i][0] for i in idx)) + slack
        d, a = torch.randn(B, M, V_D, generator=g) * 3, torch.randn(B, M, V_A, generator=g) * 3
        draft = torch.randint(0, V_A, (B, M), generator=g)
        for b, i in enumerate(idx):
            m = reqs[i][0]
            d[b, :m], a[b, :m], draft[b, :m] = own[i]
        seq = [torch.tensor([reqs[i][j] for i in idx], dtype=torch.int64, device=dev) for j in (1, 0, 2, 3)]
        d, a = d.to(torch.bfloat16).to(dev), a.to(torch.bfloat16).to(dev)
        kw = dict(temperature=0.7, top_k=40, top_p=0.9)
        ids = ops.sample_draft(d, *seq, **kw)
        target, n_acc = ops.mixture_accept(d, a, draft.to(dev), *seq, R=0.6, **kw)
        return ids.cpu(), target.cpu(), n_acc.cpu()

    n = bad = 0
    for t in (0, 1):
        m = reqs[t][0]
        alone = run([t], 0)
        for pos, mates, slack in ((0, [4], 1), (1, [2, 4, 3], 3), (2, [4, 3, 2], 0)):
            idx = [x for x in mates if x != t]
            idx.insert(pos, t)
            got = run(idx, slack)
            b = idx.index(t)
            same = (torch.equal(got[0][b, :m], alone[0][0, :m]) and torch.equal(got[1][b, :m], alone[1][0, :m])
                    and bool(got[2][b] == alone[2][0]))
            n, bad = n + 1, bad + (not same)
    return bad == 0, f"{n - bad}/{n} batches identical (draft ids, targets, n_accept)"


def check_models(dev: str, dtype: torch.dtype) -> list[tuple[str, bool, str]]:
    d_dir, a_dir = tiny.paths()
    dllm = apd_ext.load_model(d_dir, dtype=dtype, device=dev)
    ver = apd_ext.load_model(a_dir, dtype=dtype, device=dev)
    g = torch.Generator().manual_seed(2)
    V = 568  # the tiny vocabulary
    prompts = [torch.randint(3, V, (n,), generator=g) for n in (23, 7, 40)]
    rows = []
    for name, model in (("dLLM", dllm), ("verifier", ver)):
        def logits(idx, per_request):
            B, Lw = len(idx), max(len(prompts[i]) for i in idx)
            ids = torch.zeros(B, Lw, dtype=torch.int64)
            for b, i in enumerate(idx):
                ids[b, : len(prompts[i])] = prompts[i]
            cache = model.new_cache(B, Lw + 8)
            q_host = torch.tensor([len(prompts[i]) for i in idx])
            plan = Packing.build(q_host, Lw, dev, per_request=per_request)
            with torch.no_grad():
                out = model.forward(ids.to(dev), cache, torch.zeros(B, dtype=torch.int64, device=dev), q_host.to(dev),
                                    packing=plan)
            return out.cpu()

        for per_request in (False, True):
            batch = logits([0, 1, 2], per_request)
            n = bad = 0
            worst = 0.0
            for i in range(3):
                alone = logits([i], per_request)[0, : len(prompts[i])]
                same, d = _diff(batch[i, : len(prompts[i])], alone)
                n, bad, worst = n + 1, bad + (not same), max(worst, d)
            how = "one GEMM per request (batch_invariant)" if per_request else "one GEMM per step"
            rows.append((f"{name} prompt logits, tiny pair {str(dtype)[6:]}, {how}", bad == 0,
                         f"{n - bad}/{n} requests identical, max |diff| {worst:.3g}"))
    seeds = [11, 22, 33]
    kw = dict(R=0.7, W=8, M=16, temperature=0.7, top_p=0.95, max_new_tokens=32, eos_token_ids=[])
    out = apd_ext.generate(dllm, ver, [p.tolist() for p in prompts], seeds=seeds, **kw)
    agree = total = same_seqs = 0
    for b, (p, s) in enumerate(zip(prompts, seeds)):
        a = apd_ext.generate(dllm, ver, [p.tolist()], seeds=[s], **kw).generated(0).tolist()
        x = out.generated(b).tolist()
        agree += sum(u == w for u, w in zip(a, x))
        total += max(len(a), len(x))
        same_seqs += a == x
    rows.append((f"generate tokens, tiny pair {str(dtype)[6:]}", same_seqs == len(prompts),
                 f"{same_seqs}/{len(prompts)} sequences identical, {agree}/{total} tokens agree"))
    return rows


def time_engine(dev: str, dtype: torch.dtype, reps: int = 5) -> list[list[str]]:
    """The price of Engine(batch_invariant=True): the same 8 requests (tiny
    pair, 24 tokens each, sampled) through the Engine with one GEMM per step
    and with one per request, interleaved, after a warm-up; medians and
    ranges of the wall time, and the paired ratio."""
    import statistics
    import time

    from apd_ext import APDConfig, Engine

    d_dir, a_dir = tiny.paths()
    pair = (apd_ext.load_model(d_dir, dtype=dtype, device=dev), apd_ext.load_model(a_dir, dtype=dtype, device=dev))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 560, (int(n),), generator=g).tolist() for n in torch.randint(8, 60, (8,), generator=g)]

    def run(inv: bool) -> float:
        eng = Engine(*pair, APDConfig(R=0.6, W=4, M=12), max_batch=8, max_len=128, batch_invariant=inv)
        for i, p in enumerate(prompts):
            eng.add_request(p, dict(temperature=0.7, seed=i, max_new_tokens=24, stop_token_ids=[]))
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(False), run(True)  # warm-up
    t = {False: [], True: []}
    for r in range(reps):
        for inv in ((False, True) if r % 2 == 0 else (True, False)):
            t[inv].append(run(inv))
    ratio = [b / a for a, b in zip(t[False], t[True])]
    fmt = lambda xs: f"{statistics.median(xs) * 1e3:.0f} ms ({min(xs) * 1e3:.0f}..{max(xs) * 1e3:.0f})"  # noqa: E731
    return [[f"Engine, 8 requests x 24 tokens, tiny pair {str(dtype)[6:]}", fmt(t[False]), fmt(t[True]),
             f"{statistics.median(ratio):.2f}x ({min(ratio):.2f}..{max(ratio):.2f})"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--time", action="store_true", help="also time Engine(batch_invariant=True) against the default")
    args = ap.parse_args(argv)
    dev = args.device
    if args.time:
        body = time_engine(dev, torch.float32) + time_engine(dev, torch.bfloat16)
        emit_table(f"the price of batch_invariant=True on {dev} (5 interleaved runs after a warm-up)",
                   ["workload", "one GEMM per step", "one GEMM per request", "paired ratio"], body, args.markdown)
    body = []
    for impl, dtype in (("simple", torch.float32), ("simple", torch.bfloat16), ("mma", torch.bfloat16)):
        for causal in (False, True):
            ok, what = check_attention(dev, dtype, impl, causal)
            kernel = impl if dev.startswith("cuda") else "(CPU kernel)"  # APD_ATTN_IMPL picks a CUDA kernel
            body.append([f"window_attention {kernel} {str(dtype)[6:]} {'causal' if causal else 'bidir'}",
                         "yes" if ok else "NO", what])
    os.environ.pop("APD_ATTN_IMPL", None)
    ok, what = check_sampling(dev)
    body.append(["sample_draft + mixture_accept bf16", "yes" if ok else "NO", what])
    for dtype in (torch.float32, torch.bfloat16):
        for name, ok, what in check_models(dev, dtype):
            body.append([name, "yes" if ok else "NO", what])
    emit_table(f"batch invariance on {dev}: a request alone vs inside mixed batches", ["check", "bit-identical",
               "detail"], body, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
