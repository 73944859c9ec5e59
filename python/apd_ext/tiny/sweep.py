"""`apd sweep`: APD's quality/speed trade-off on an arithmetic task file.

Rows: AR greedy; dLLM left-to-right with K in {1, 2, 4, 8} (no KV cache: every
step recomputes the whole sequence, so K=1 is exact); APD over R in
{0.1, 0.3, 0.5, 0.7, 0.9} at fixed (W, M); a small W/M panel at fixed R.
Columns: accuracy (exact match of the final number), tokens per dLLM forward
(per AR forward for the AR baseline), tokens/s. Greedy (temperature 0) unless
--temperature is given. Writes a CSV, and a PNG when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from apd_ext.tiny.demo import DEFAULT_M, DEFAULT_R, DEFAULT_W, MAX_NEW

# The default problem count: the 14 rows cost about 11 s a problem on a
# 2-core CPU (issue 26's measurement), so 20 problems take about 4 minutes
# (measured: 507 s at load average 14.5 on the shared 2-core machine).
DEFAULT_LIMIT = 20
R_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
K_GRID = (1, 2, 4, 8)
WM_PANEL = ((4, DEFAULT_M), (32, DEFAULT_M), (DEFAULT_W, 8), (DEFAULT_W, 16))
FIELDS = ["method", "panel", "K", "R", "W", "M", "n", "accuracy", "tokens_per_dllm_forward",
          "tokens_per_forward", "tokens_per_s", "generated_tokens", "dllm_forwards",
          "verifier_forwards", "seconds"]


def configs(wm_panel: bool = True, ks=K_GRID, rs=R_GRID, ar: bool = True) -> list[dict]:
    out = [{"method": "ar_greedy", "panel": "main"}] if ar else []
    out += [{"method": "leftright", "panel": "main", "K": k} for k in ks]
    out += [{"method": "apd", "panel": "main", "R": r, "W": DEFAULT_W, "M": DEFAULT_M} for r in rs]
    if wm_panel:
        out += [{"method": "apd", "panel": "wm", "R": DEFAULT_R, "W": w, "M": m} for w, m in WM_PANEL]
    return out


def _progress(i: int, n: int, label: str, t0: float, stream=sys.stderr) -> None:
    width = 30
    done = int(width * i / max(1, n))
    eta = (time.time() - t0) / max(1, i) * (n - i)
    stream.write(f"\r{label:<28} [{'#' * done}{'.' * (width - done)}] {i}/{n} eta {eta:5.0f}s")
    if i == n:
        stream.write("\n")
    stream.flush()


def run_config(cfg: dict, dllm, ar, tok, probs, args, show: bool = True) -> dict:
    import apd_ext
    from apd_ext.tasks import arith
    from apd_ext.tiny.demo import encode_prompt, generated_text

    correct = gen = dfw = vfw = 0
    secs = 0.0
    label = cfg["method"] + "".join(f" {k}={cfg[k]}" for k in ("K", "R", "W", "M") if k in cfg)
    t0 = time.time()
    for i, p in enumerate(probs):
        x = encode_prompt(tok, p.question)
        common = dict(temperature=args.temperature, seed=args.seed + i, max_new_tokens=args.max_new_tokens)
        if cfg["method"] == "ar_greedy":
            out = apd_ext.generate_ar(ar, x, **common)
        elif cfg["method"] == "leftright":
            # exact left-to-right (no stale KV): the quality reference APD is compared with
            out = apd_ext.generate_leftright(dllm, x, K=cfg["K"], **common)
        else:
            out = apd_ext.generate(dllm, ar, x, R=cfg["R"], W=cfg["W"], M=cfg["M"], **common)
        st = out.stats
        correct += arith.score(generated_text(tok, out), p.final)
        gen += st.generated_tokens
        dfw += st.dllm_forwards
        vfw += st.verifier_forwards
        secs += st.seconds
        if show:
            _progress(i + 1, len(probs), label, t0)
    fw = dfw if cfg["method"] != "ar_greedy" else vfw
    return {**{k: cfg.get(k, "") for k in ("method", "panel", "K", "R", "W", "M")},
            "n": len(probs), "accuracy": round(correct / max(1, len(probs)), 4),
            "tokens_per_dllm_forward": round(gen / dfw, 3) if dfw else "",
            "tokens_per_forward": round(gen / max(1, fw), 3),
            "tokens_per_s": round(gen / max(secs, 1e-9), 1), "generated_tokens": gen,
            "dllm_forwards": dfw, "verifier_forwards": vfw, "seconds": round(secs, 3)}


def plot(rows: list[dict], path: Path) -> bool:
    """Pareto plot: accuracy vs tokens per forward and vs tokens/s; W/M panel. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    main = [r for r in rows if r["panel"] == "main"]
    for ax, key, xl in ((axes[0], "tokens_per_forward", "tokens per forward (dLLM; AR for AR)"),
                        (axes[1], "tokens_per_s", "tokens/s")):
        for method, mk, name in (("ar_greedy", "s", "AR greedy"), ("leftright", "o", "dLLM left-to-right K"),
                                 ("apd", "^", "APD R")):
            pts = [r for r in main if r["method"] == method]
            xs = [float(r[key]) for r in pts]
            ys = [100 * float(r["accuracy"]) for r in pts]
            ax.plot(xs, ys, marker=mk, label=name, linestyle="-" if len(pts) > 1 else "none")
            for r, x_, y_ in zip(pts, xs, ys):
                tag = f"K={r['K']}" if method == "leftright" else (f"R={r['R']}" if method == "apd" else "")
                if tag:
                    ax.annotate(tag, (x_, y_), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(xl)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    wm = [r for r in rows if r["method"] == "apd" and (r["panel"] == "wm" or r["R"] == DEFAULT_R)]
    for r in wm:
        axes[2].scatter(float(r["tokens_per_s"]), 100 * float(r["accuracy"]), marker="^")
        axes[2].annotate(f"W={r['W']} M={r['M']}", (float(r["tokens_per_s"]), 100 * float(r["accuracy"])),
                         textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes[2].set_xlabel(f"tokens/s (APD, R={DEFAULT_R})")
    axes[2].set_ylabel("accuracy (%)")
    axes[2].set_title("W / M")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="apd sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dllm", default=None, help="dLLM checkpoint folder (default: embedded)")
    ap.add_argument("--ar", dest="verifier", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name
    ap.add_argument("--verifier", dest="verifier", default=None,
                    help="AR verifier folder (default: embedded)")
    ap.add_argument("--tasks", default=None, help="JSONL task file (default: embedded 500 test problems)")
    ap.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                    help=f"first N problems (default {DEFAULT_LIMIT}: about 4 minutes on 2 idle CPU cores for all "
                    "14 rows; raise it for tighter accuracies, up to 500 for the whole test file)")
    ap.add_argument("--out", default="apd_sweep", help="output prefix: writes PREFIX.csv and PREFIX.png")
    ap.add_argument("--no-wm", action="store_true", help="skip the W/M panel")
    ap.add_argument("--no-ar", action="store_true", help="skip the AR greedy row")
    ap.add_argument("--K", default=",".join(map(str, K_GRID)), help="left-to-right K values ('' for none)")
    ap.add_argument("--R", default=",".join(map(str, R_GRID)), help="APD R values ('' for none)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit: expected an int >= 1, got {args.limit}")

    from apd_ext._validate import check_device
    from apd_ext.models.config import check_folder
    from apd_ext.tasks import arith
    from apd_ext.tiny import test_file
    from apd_ext.tiny.demo import load_pair

    args.device = str(check_device("--device", args.device))  # one line, before any loading
    for flag, folder in (("--dllm", args.dllm), ("--verifier", args.verifier)):
        if folder is not None:
            check_folder(flag, folder)

    probs = arith.load_jsonl(args.tasks or test_file())[: args.limit]
    dllm, ar, tok = load_pair(args.dllm, args.verifier, args.dtype, args.device)
    try:
        ks = [int(k) for k in args.K.split(",") if k.strip()]
        rs = [float(r) for r in args.R.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--K / --R: expected comma-separated numbers, got {args.K!r} / {args.R!r}")
    rows = [run_config(c, dllm, ar, tok, probs, args, show=not args.quiet)
            for c in configs(not args.no_wm, ks, rs, not args.no_ar)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out.with_suffix('.csv')}")
    if plot(rows, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    else:
        print("matplotlib not installed: no PNG (pip install 'apd-ext[plot]')")
    cols = ["method", "K", "R", "W", "M", "accuracy", "tokens_per_forward", "tokens_per_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
