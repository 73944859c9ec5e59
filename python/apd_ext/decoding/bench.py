"""End-to-end APD benchmark (bench/bench_e2e.py and `apd bench`).

Random weights make acceptance meaningless, so every APD path runs a fixed
acceptance schedule (ACCEPT tokens per step; the paper reports 7.62 on GSM8K
at (0.7, 16, 100)) through a benchmarking-only hook, with EOS disabled. Rows:

- apd            our loop (apd_ext.generate): ms/step with its dLLM / verifier /
                 sampling breakdown, projected tokens/s = ACCEPT / step time;
- apd+graphs     the same with cuda_graphs=True (CUDA only);
- apd-reference  the transformers reference loop (apd_ext.reference_loop) on
                 the same weights, same schedule;
- leftright      our left-to-right dLLM baseline, K = ACCEPT tokens per step,
                 same W and M (the step without the verifier);
- ar             our plain AR decoding with the verifier model (1 token/step).

Robust to a noisy (shared) machine: the methods run interleaved, one
generation each per round in rotating order, for --repeats rounds; the table
gives the median ms/step with its min..max spread, and the speed-up against
the reference as the median (min..max) of the ratios within each round.

With --whole (default on CUDA) the APD rows also time one complete
max-new-tokens generation (the "whole-gen tok/s" column).

Shapes: tiny models on the CPU; Dream-7B + Qwen2.5-0.5B shapes (random
weights, bf16) on CUDA. The floor of an APD step is reading both models'
weights once (embedding tables excluded: they are only gathered) at the copy
bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from typing import List

import torch

DREAM_7B = dict(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4, inter=18944, tie=False)
QWEN_05B = dict(vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, inter=4864, tie=True)
TINY_DLLM = dict(vocab=4096, hidden=256, layers=4, heads=8, kv_heads=2, inter=768, tie=False)
TINY_AR = dict(vocab=4096, hidden=128, layers=4, heads=4, kv_heads=2, inter=384, tie=True)
CONFIGS = [(0.7, 16, 100), (0.6, 32, 200)]


def add_arguments(p) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--shapes", default="auto", choices=("auto", "tiny", "real"),
                   help="auto: real (Dream-7B / Qwen2.5-0.5B) on CUDA, tiny on the CPU")
    p.add_argument("--accept", type=int, default=8, help="tokens accepted per APD step (fixed schedule)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed APD steps per generation (default 6 CPU, 16 CUDA)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="generation budget: windows are min(M, what is left) rows, as in a real run")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 64 CPU, 256 CUDA)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved rounds: each method runs once per round, in rotating order; the table "
                   "gives medians and the min..max spread (default 5)")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers reference loop")
    p.add_argument("--whole", action=argparse.BooleanOptionalAction, default=None,
                   help="also time one complete max-new-tokens generation per APD row (default: on CUDA)")
    p.add_argument("--markdown", default=None, help="append the table as markdown to this file")


def _resolve(args):
    from apd_ext._validate import check_device

    device = check_device("--device", args.device)
    cuda = device.type == "cuda"
    shapes = args.shapes if args.shapes != "auto" else ("real" if cuda else "tiny")
    return (device, shapes, args.steps or (16 if cuda else 6), args.prompt_len or (256 if cuda else 64),
            5 if args.repeats is None else args.repeats)


def build_hf(shape: dict, dtype, device, seed: int):
    """A random Qwen2ForCausalLM of the given shape, built directly on the device."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], tie_word_embeddings=shape["tie"], rope_theta=1e6,
        max_position_embeddings=4096, attn_implementation="sdpa", eos_token_id=2, bos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    return model


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n) + (
        model.lm_head.weight.numel() * model.lm_head.weight.element_size() if model.config.tie_word_embeddings else 0)


def copy_bandwidth(device) -> float:
    """Read + write GB/s of a large device copy (median of a few)."""
    n = (1 << 30 if device.type == "cuda" else 1 << 26) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times) / 1e9


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 24
        fill = int(width * self.done / self.total)
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                         f"{time.perf_counter() - self.t0:6.1f} s  {label[:48]:<48}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _sample(sec: float, steps: int, gen: int, dllm=None, ver=None, samp=None) -> dict:
    return dict(sec=sec, steps=steps, gen=gen, dllm=dllm, ver=ver, samp=samp)


def _of_stats(s) -> dict:
    return _sample(s.seconds, s.steps, s.generated_tokens, s.dllm_seconds, s.verifier_seconds, s.sampling_seconds)


def interleaved(runners: dict, repeats: int) -> dict:
    """name -> [one sample per round]. Every runner is warmed up once, then the
    rounds run each runner once, the order rotating by one each round. A load
    burst on a shared machine then hits all implementations alike (and no one
    always runs first or last), and a round's samples are paired: ratios are
    taken within a round, where the machine's state is the same for both."""
    names = list(runners)
    for n in names:
        runners[n]()  # warm-up (allocator, kernels, lazy init, graph capture)
    out = {n: [] for n in names}
    for i in range(repeats):
        for n in names[i % len(names):] + names[: i % len(names)]:
            out[n].append(runners[n]())
    return out


def _median_sample(samples: List[dict]) -> dict:
    return sorted(samples, key=lambda x: x["sec"] / x["steps"])[(len(samples) - 1) // 2]


def _row(base: dict, method: str, samples: List[dict]) -> dict:
    """Median ms/step over the rounds (the breakdown of that median round) and the spread."""
    ms = [x["sec"] / x["steps"] * 1e3 for x in samples]
    m = _median_sample(samples)
    per = (lambda v: None if v is None else v / m["steps"] * 1e3)
    return dict(base, method=method, ms_step=statistics.median(ms), ms_step_min=min(ms), ms_step_max=max(ms),
                repeats=len(samples), steps=m["steps"], dllm_ms=per(m["dllm"]), verifier_ms=per(m["ver"]),
                sampling_ms=per(m["samp"]), tokens_per_step=m["gen"] / m["steps"],
                tokens_per_s=statistics.median(x["gen"] / x["sec"] for x in samples))


def paired_speedup(ours: List[dict], ref: List[dict]) -> tuple:
    """(median, min, max) over rounds of reference ms/step / ours ms/step, same round."""
    r = [(b["sec"] / b["steps"]) / (a["sec"] / a["steps"]) for a, b in zip(ours, ref)]
    return statistics.median(r), min(r), max(r)


def run(args, progress: bool = False) -> List[dict]:
    import apd_ext
    from apd_ext.reference_loop import reference_generate

    device, shapes, steps, plen, repeats = _resolve(args)
    whole = args.whole if args.whole is not None else device.type == "cuda"
    if repeats < 1:
        raise ValueError(f"--repeats: expected an int >= 1, got {repeats}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sd, sa = (DREAM_7B, QWEN_05B) if shapes == "real" else (TINY_DLLM, TINY_AR)
    accept = args.accept
    if accept < 1:
        raise ValueError(f"--accept: expected an int >= 1, got {accept}")
    bar = _Progress(len(CONFIGS) + 1, progress)

    hf_d = build_hf(sd, dtype, device, seed=0)
    hf_a = build_hf(sa, dtype, device, seed=1)
    mask_id = sd["vocab"] - 1
    dllm = apd_ext.load_model(hf_d, kind="dllm", mask_token_id=mask_id)
    ver = apd_ext.load_model(hf_a, kind="ar")
    bw = copy_bandwidth(device)
    floor_ms = (_weight_bytes(hf_d) + _weight_bytes(hf_a)) / (bw * 1e9) * 1e3
    bar.step("models built")
    g = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(3, min(sd["vocab"], sa["vocab"]) - 1, (1, plen), generator=g)
    new = max(args.max_new_tokens, accept * steps)
    common = dict(temperature=0.2, top_p=0.95, max_new_tokens=new, seed=0, eos_token_ids=[])
    # The AR baseline decodes as many tokens as APD commits in its timed steps.
    ar_common = dict(common, max_new_tokens=accept * steps)

    rows = []
    for R, W, M in CONFIGS:
        label = f"({R}, {W}, {M})"

        def ours(stop=steps, graphs=False):
            return _of_stats(apd_ext.generate(dllm, ver, prompt, R=R, W=W, M=M, _n_accept_override=accept,
                                              _stop_after_steps=stop, cuda_graphs=graphs, **common).stats)

        def reference(stop=steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = reference_generate(hf_d, hf_a, prompt[0].tolist(), mask_token_id=mask_id, eos_token_ids=[],
                                   R=R, W=W, M=M, temperature=0.2, top_p=0.95, max_new_tokens=new,
                                   seed=0, n_accept_override=accept, max_steps=stop)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return _sample(time.perf_counter() - t0, len(r.accepted_per_step), r.num_generated)

        def leftright():
            return _of_stats(apd_ext.generate_leftright(dllm, prompt, K=accept, W=W, M=M,
                                                        _stop_after_steps=steps, **common).stats)

        def ar():
            return _of_stats(apd_ext.generate_ar(ver, prompt, **ar_common).stats)

        runners = {"apd": ours}
        if device.type == "cuda":
            try:
                ours(graphs=True)
                runners["apd+graphs"] = lambda: ours(graphs=True)
            except Exception as e:  # noqa: BLE001  (report, keep the other rows)
                print(f"\napd+graphs {label} failed: {type(e).__name__}: {e}", file=sys.stderr)
        if not args.no_reference:
            runners["apd-reference"] = reference
        runners[f"leftright K={accept}"] = leftright
        runners["ar (verifier)"] = ar
        samples = interleaved(runners, repeats)
        base = dict(device=str(device), shapes=shapes, config=label, accept=accept, floor_ms=floor_ms)
        for name, smp in samples.items():
            row = _row(base, name, smp)
            if name in ("apd", "apd+graphs"):
                row["x_floor"] = row["ms_step"] / floor_ms
                if "apd-reference" in samples:
                    row["speedup_vs_reference"], row["speedup_min"], row["speedup_max"] = \
                        paired_speedup(smp, samples["apd-reference"])
                if whole:
                    o = ours(stop=None, graphs=name == "apd+graphs")
                    row["gen_tokens_per_s"] = o["gen"] / o["sec"]
            elif name == "apd-reference" and whole:
                o = reference(stop=None)
                row["gen_tokens_per_s"] = o["gen"] / o["sec"]
            rows.append(row)
        bar.step(f"{label}: {len(runners)} methods x {repeats} interleaved rounds")
    return rows


COLUMNS = [("config", "(R, W, M)", "{}"), ("method", "method", "{}"), ("ms_step", "ms/step", "{:.2f}"),
           ("ms_spread", "min..max", "{}"),
           ("dllm_ms", "dLLM ms", "{:.2f}"), ("verifier_ms", "verifier ms", "{:.2f}"),
           ("sampling_ms", "sampling ms", "{:.2f}"), ("tokens_per_step", "tok/step", "{:.1f}"),
           ("tokens_per_s", "tok/s", "{:.1f}"), ("gen_tokens_per_s", "whole-gen tok/s", "{:.1f}"),
           ("speedup_vs_reference", "vs reference", "{:.2f}x"), ("speedup_spread", "(min..max)", "{}"),
           ("x_floor", "x floor", "{:.2f}")]


def _cells(r) -> List[str]:
    r = dict(r)
    if r.get("ms_step_min") is not None:
        r["ms_spread"] = f"{r['ms_step_min']:.2f}..{r['ms_step_max']:.2f}"
    if r.get("speedup_min") is not None:
        r["speedup_spread"] = f"{r['speedup_min']:.2f}..{r['speedup_max']:.2f}x"
    return ["-" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in COLUMNS]


def print_table(rows: List[dict], args) -> None:
    if not rows:
        return
    r0 = rows[0]
    title = (f"APD end to end, {r0['shapes']} shapes on {r0['device']}, fixed schedule {r0['accept']} tokens/step; "
             f"medians of {r0['repeats']} interleaved rounds (speed-ups paired within a round); "
             f"floor (both models' weights once at copy bandwidth) {r0['floor_ms']:.3f} ms/step")
    head = [h for _, h, _ in COLUMNS]
    body = [_cells(r) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    print(title)
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for b in body:
        print("  ".join(c.rjust(w) for c, w in zip(b, widths)))
    if getattr(args, "markdown", None):
        with open(args.markdown, "a") as f:
            f.write(f"\n### {title}\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
            for b in body:
                f.write("| " + " | ".join(b) + " |\n")


def write_csv(rows: List[dict], path: str) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(rows)


def plot(rows: List[dict], path: str) -> bool:
    """tokens/s and ms/step per method and config; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    configs = list(dict.fromkeys(r["config"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(methods)
    for k, (key, label) in enumerate((("tokens_per_s", "tokens/s"), ("ms_step", "ms/step"))):
        ax = axes[k]
        for j, m in enumerate(methods):
            vals = [next((r[key] for r in rows if r["config"] == c and r["method"] == m), 0.0) for c in configs]
            ax.bar([i + j * width for i in range(len(configs))], vals, width, label=m)
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(configs))])
        ax.set_xticklabels([f"(R,W,M)={c}" for c in configs])
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"APD end to end: {r0['shapes']} shapes, {r0['device']}, {r0['accept']} tokens/step (fixed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
