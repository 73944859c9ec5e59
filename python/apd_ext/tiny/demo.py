"""`apd demo`: APD on the embedded tiny pair, one arithmetic test problem.

Streams the blocks the verifier accepts (alternating colours on a terminal),
then prints the answer, whether it matches the reference, tokens per dLLM
forward and tokens/s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apd_ext.tiny import DEFAULTS

# The embedded pair's defaults (apd_ext.tiny.DEFAULTS); the sweep varies R, W, M around them.
DEFAULT_R, DEFAULT_W, DEFAULT_M = DEFAULTS["R"], DEFAULTS["W"], DEFAULTS["M"]
MAX_NEW = DEFAULTS["max_new_tokens"]
_COLOURS = ["\033[38;5;45m", "\033[38;5;214m", "\033[38;5;120m", "\033[38;5;207m"]
_RESET, _BOLD = "\033[0m", "\033[1m"


def load_pair(dllm_dir=None, ar_dir=None, dtype: str = "float32", device: str = "cpu"):
    """(dllm, verifier, tokenizer) from checkpoint folders (default: the embedded pair)."""
    import torch

    import apd_ext
    from apd_ext.tiny import paths, tokenizer

    d_def, a_def = paths()
    dllm_dir = Path(dllm_dir or d_def)
    ar_dir = Path(ar_dir or a_def)
    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    dllm = apd_ext.load_model(str(dllm_dir), dtype=dt, device=device)
    ar = apd_ext.load_model(str(ar_dir), dtype=dt, device=device)
    tok = tokenizer(dllm_dir)
    return dllm, ar, tok


def encode_prompt(tok, question: str):
    import torch

    from apd_ext.tasks import arith
    ids = tok(arith.prompt_of(question), add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def generated_text(tok, out) -> str:
    ids = out.generated(0).tolist()
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    return tok.decode(ids, skip_special_tokens=True)


def _streamer(colour: bool, stream=sys.stdout):
    """A generate() text_callback printing each step's text as it is committed
    (the Engine's incremental detokenizer: complete characters, O(step) each)."""
    state = {"block": 0}

    def cb(step: int, text_deltas) -> None:
        new = text_deltas[0]
        if not new:
            return
        if colour:
            new = _COLOURS[state["block"] % len(_COLOURS)] + new + _RESET
        state["block"] += 1
        stream.write(new)
        stream.flush()

    return cb


def main(argv: list[str] | None = None) -> int:
    from apd_ext.cli import positive_int, window
    from apd_ext.tiny import vocabulary_summary

    ap = argparse.ArgumentParser(prog="apd demo", description=__doc__,
                                 epilog="The embedded pair " + vocabulary_summary(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=int, default=0, help="test problem index (0..499)")
    ap.add_argument("--question", default=None,
                    help="your own word problem instead of a test one (the task's words only: see below)")
    ap.add_argument("--R", type=float, default=DEFAULT_R)
    ap.add_argument("--W", type=window, default=DEFAULT_W, help="recompute window, or 'none'")
    ap.add_argument("--M", type=positive_int, default=DEFAULT_M)
    ap.add_argument("--temperature", type=float, default=DEFAULTS["temperature"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=positive_int, default=MAX_NEW)
    ap.add_argument("--dllm", default=None, help="dLLM checkpoint folder (default: embedded)")
    ap.add_argument("--ar", dest="verifier", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name
    ap.add_argument("--verifier", dest="verifier", default=None,
                    help="AR verifier folder (default: embedded)")
    ap.add_argument("--tasks", default=None, help="JSONL task file (default: embedded test set)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    args = ap.parse_args(argv)

    import apd_ext
    from apd_ext._validate import check_device
    from apd_ext.errors import UsageError
    from apd_ext.models.config import check_folder
    from apd_ext.tasks import arith
    from apd_ext.tiny import test_file, unknown_words

    args.device = str(check_device("--device", args.device))  # one line, before any loading
    for flag, folder in (("--dllm", args.dllm), ("--verifier", args.verifier)):
        if folder is not None:
            check_folder(flag, folder)
    if args.question is not None and not args.question.strip():
        raise UsageError("--question: expected a word problem, got an empty string")
    if args.question is not None and unknown_words(args.question):
        print(f"apd: warning: outside the embedded pair's training vocabulary: "
              f"{', '.join(unknown_words(args.question))} (see `apd demo --help`)", file=sys.stderr)

    if args.question is not None:
        question, final = args.question, None
    else:
        probs = arith.load_jsonl(args.tasks or test_file())
        if not 0 <= args.index < len(probs):
            ap.error(f"--index: expected 0..{len(probs) - 1}, got {args.index}")
        question, final = probs[args.index].question, probs[args.index].final
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())

    dllm, ar, tok = load_pair(args.dllm, args.verifier, args.dtype, args.device)
    prompt = encode_prompt(tok, question)
    print(f"{_BOLD if colour else ''}Question:{_RESET if colour else ''} {question}")
    print(f"APD R={args.R} W={args.W} M={args.M} temperature={args.temperature}"
          f" ({'blocks accepted per step alternate colours' if colour else 'streaming'}):")
    out = apd_ext.generate(dllm, ar, prompt, R=args.R, W=args.W, M=args.M,
                           temperature=args.temperature, top_p=DEFAULTS["top_p"], seed=args.seed,
                           max_new_tokens=args.max_new_tokens, tokenizer=tok,
                           text_callback=_streamer(colour))
    print()
    text = generated_text(tok, out)
    got = arith.extract_answer(text)
    st = out.stats
    verdict = "" if final is None else (f" (reference {final}: "
                                         f"{'correct' if got == final else 'WRONG'})")
    print(f"Answer: {got}{verdict}")
    print(f"{st.generated_tokens} tokens in {st.steps} steps, {st.dllm_forwards} dLLM forwards: "
          f"{st.generated_tokens / max(1, st.dllm_forwards):.2f} tokens per dLLM forward, "
          f"{st.tokens_per_second:.1f} tokens/s on {args.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
