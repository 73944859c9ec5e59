"""Benchmark the apd model runtime (issue 4) against transformers' own modules.

Two forwards of one APD step, with random weights at the real shapes on CUDA
(tiny shapes on the CPU):
- dLLM window: Dream-7B shape, B=1, a window of 116 rows at the end of a
  512-position context, bidirectional, LM head on the 100 drafted rows;
- verifier draft: Qwen2.5-0.5B shape (tied head), B=1, M=100 causal rows after
  a 412-position prefix, LM head on every row; eager and CUDA-graphed.
The baseline is transformers' Qwen2ForCausalLM holding the same weights (the
runtime is built over its tensors, q/k/v and gate/up fused as a folder load
does; without transformers the runtime alone runs on random weights), with a
DynamicCache prefilled to the
same prefix and cropped back after each call, SDPA attention, and a zero 4D
mask (bidirectional) for the dLLM. The floor is every weight read once
(embedding table excluded: it is only gathered) at the copy bandwidth measured
in the same run.

    python bench/bench_models.py --device cpu
    python bench/bench_models.py --device cuda --markdown out.md
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import apd_ext  # noqa: E402
from apd_ext.models import Qwen2Runtime  # noqa: E402
from apd_ext.decoding.bench import build_hf  # noqa: E402  (random Qwen2 of a given shape)
from bench_common import copy_bandwidth, emit_table, fmt, timer  # noqa: E402

DREAM_7B = dict(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4, inter=18944, tie=False)
QWEN_05B = dict(vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, inter=4864, tie=True)
TINY_DLLM = dict(vocab=4096, hidden=256, layers=4, heads=8, kv_heads=2, inter=768, tie=False)
TINY_AR = dict(vocab=4096, hidden=128, layers=4, heads=4, kv_heads=2, inter=384, tie=True)


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def weight_bytes(model) -> int:
    """Bytes of every weight a forward reads (the embedding is only gathered)."""
    tensors = [t for L in model.layers for t in vars(L).values() if t is not None] + [model.norm, model.lm_head]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}  # views counted once
    return sum(storages.values())


def bench_case(name, shape, *, kind, ctx, window, row_start, n_rows, dtype, device, time_fn, bw, graphs):
    mask_id = shape["vocab"] - 1 if kind == "dllm" else None
    if have_transformers():
        hf = build_hf(shape, dtype, device, seed=0)
        live = apd_ext.load_model(hf, kind=kind, mask_token_id=mask_id)
        # The runtime as a folder load builds it (gate/up fused), over the same weights.
        model = Qwen2Runtime(live.kind, live.config, hf.state_dict(), fuse_mlp=True)
        del live
    else:  # the runtime alone, on random weights
        hf = None
        cfg = {"model_type": "Dream" if kind == "dllm" else "qwen2", "vocab_size": shape["vocab"],
               "hidden_size": shape["hidden"], "intermediate_size": shape["inter"],
               "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
               "num_key_value_heads": shape["kv_heads"], "tie_word_embeddings": shape["tie"],
               "rope_theta": 1e6, "mask_token_id": mask_id}
        model = apd_ext.models.random_model(cfg, dtype=dtype, device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, shape["vocab"] - 1, (1, ctx), generator=g).to(device)
    left = ctx - window
    win = ids[:, left:].contiguous()
    i64 = lambda x: torch.tensor([x], dtype=torch.int64, device=device)  # noqa: E731
    cache = model.new_cache(1, ctx)
    model.forward(ids[:, :left], cache, i64(0), i64(left), logit_rows=(i64(0), 1))  # the prefix
    q_start, q_len, rows = i64(left), i64(window), (i64(row_start), n_rows)

    out = {"name": name, "ctx": ctx, "window": window, "rows": n_rows}
    out["apd"] = time_fn(lambda: model.forward(win, cache, q_start, q_len, logit_rows=rows))
    out["graph"] = None
    if graphs:
        gf = model.graphed(cache, window, n_rows=n_rows)
        out["graph"] = time_fn(lambda: gf(win, q_start, q_len, rows[0]))
        got = gf(win, q_start, q_len, rows[0]).float()
        want = model.forward(win, cache, q_start, q_len, logit_rows=rows).float()
        out["graph_diff"] = float((got - want).abs().max())
        del gf

    out["hf"] = out["maxdiff"] = None
    nbytes = weight_bytes(model)
    out["weights_gb"] = nbytes / 1e9
    out["floor"] = nbytes / (bw * 1e9) * 1e3
    if hf is None:
        return out
    from transformers import DynamicCache

    hcache = DynamicCache(config=hf.config)
    # Prefix as the runtime computed it (bidirectional for the dLLM), then the window.
    bidir = lambda q, k: {"full_attention": torch.zeros(1, 1, q, k, dtype=dtype, device=device)}  # noqa: E731
    with torch.no_grad():
        hf(input_ids=ids[:, :left], attention_mask=bidir(left, left) if kind == "dllm" else None, cache=hcache,
           use_cache=True, logits_to_keep=1)
    mask = bidir(window, ctx) if kind == "dllm" else None
    keep = torch.arange(row_start, row_start + n_rows, device=device)

    @torch.no_grad()
    def hf_step():
        r = hf(input_ids=win, attention_mask=mask, cache=hcache, use_cache=True, logits_to_keep=keep).logits
        hcache.crop(-window)
        return r

    out["hf"] = time_fn(hf_step)
    # Both paths agree (a coarse check that the benchmark times the same computation).
    diff = (hf_step().float() - model.forward(win, cache, q_start, q_len, logit_rows=rows).float()).abs().max()
    out["maxdiff"] = float(diff)
    return out




def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 30 cuda, 10 cpu)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: stable timings on a shared machine)")
    ap.add_argument("--markdown", default=None, help="append the table as markdown to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    torch.manual_seed(0)
    if not cuda:
        torch.set_num_threads(args.threads)
    time_fn = timer(device, warmup=5 if cuda else 2, iters=args.iters or (30 if cuda else 10), budget_s=3.0)
    bw = copy_bandwidth(device, time_fn, 1 << 30 if cuda else 1 << 26, unit_s=1e-3)

    if cuda:
        cases = [
            ("dLLM window (Dream-7B)", DREAM_7B, dict(kind="dllm", ctx=512, window=116, row_start=15, n_rows=100)),
            ("verifier draft (Qwen2.5-0.5B)", QWEN_05B, dict(kind="ar", ctx=512, window=100, row_start=0, n_rows=100)),
        ]
    else:
        cases = [
            ("dLLM window (tiny)", TINY_DLLM, dict(kind="dllm", ctx=128, window=36, row_start=3, n_rows=32)),
            ("verifier draft (tiny)", TINY_AR, dict(kind="ar", ctx=128, window=32, row_start=0, n_rows=32)),
        ]
    rows = []
    for name, shape, kw in cases:
        r = bench_case(name, shape, dtype=dtype, device=device, time_fn=time_fn, bw=bw, graphs=cuda, **kw)
        rows.append(r)
        if cuda:
            torch.cuda.empty_cache()
        print(f"  {name}: apd {r['apd']:.3f} ms, graphed {fmt(r['graph'], '.3f')} ms, "
              f"transformers {fmt(r['hf'], '.3f')} ms, floor {r['floor']:.3f} ms, "
              f"max |apd - transformers| {fmt(r['maxdiff'], '.3g')}"
              + (f", max |graphed - eager| {r['graph_diff']:.3g}" if "graph_diff" in r else ""), flush=True)

    head = ["forward", "ctx", "window", "logit rows", "apd ms", "graphed ms", "transformers ms", "hf/apd",
            "weights GB", "floor ms", "apd/floor", "best/floor"]
    body = []
    for r in rows:
        best = min(x for x in (r["apd"], r["graph"]) if x is not None)
        speedup = fmt(r["hf"] and r["hf"] / r["apd"], ".2f") + ("x" if r["hf"] else "")
        body.append([r["name"], r["ctx"], r["window"], r["rows"], fmt(r["apd"], ".3f"), fmt(r["graph"], ".3f"),
                     fmt(r["hf"], ".3f"), speedup, f"{r['weights_gb']:.3f}",
                     fmt(r["floor"], ".3f"), f"{r['apd'] / r['floor']:.2f}x", f"{best / r['floor']:.2f}x"])
    body = [[str(c) for c in b] for b in body]
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    title = (f"model forwards on {device} ({where}), {str(dtype).replace('torch.', '')}, B=1, random weights; "
             f"copy bandwidth {bw:.0f} GB/s (floor = weight bytes / that); hf/apd > 1 means apd is faster")
    emit_table(title, head, body, args.markdown)


if __name__ == "__main__":
    main()
