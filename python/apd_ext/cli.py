"""The `apd` command.

    apd generate --dllm PATH --verifier PATH --prompt TEXT [options]
    apd serve    --dllm PATH --verifier PATH [--replicas N] [--port P]
    apd bench    [--device cpu|cuda] [--csv FILE] [--plot FILE] [--markdown FILE]
    apd demo     ...   (the embedded tiny pair; see `apd demo --help`)
    apd sweep    ...   (R / W / M sweep on the embedded tiny pair)

Errors in the input (a missing folder, a bad knob, incompatible models) end
with a one-line message and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import List, Optional

from apd_ext.errors import UsageError

METHODS = ("apd", "leftright", "diffusion", "ar")
_COLOURS = ["\033[36m", "\033[33m", "\033[32m", "\033[35m", "\033[34m", "\033[31m"]
_RESET = "\033[0m"


# Optional features -> (the modules they import, the pyproject extra that installs them).
EXTRAS = {
    "serve": (("ray.serve", "fastapi", "httpx"), "serve"),
    "lm-eval": (("lm_eval",), "eval"),
    "plot": (("matplotlib",), "plot"),
}


def missing_extra(feature: str) -> Optional[str]:
    """None when ``feature``'s modules import, else the one line that says what to install."""
    modules, extra = EXTRAS[feature]
    for mod in modules:
        # Found, not imported: importing ray here would fix its settings before
        # `apd serve` sets them (a loopback server's single-node mode is read
        # when ray is first imported).
        top = mod.split(".")[0]
        try:
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"{feature} needs {top}, which is not installed: pip install 'apd-ext[{extra}]'"
    return None


def _embedded_defaults():
    """(dllm_dir, ar_dir) of the embedded tiny pair, when it is installed."""
    try:
        from apd_ext.tiny import paths
    except ImportError:
        return None, None
    try:
        d, a = paths()
    except Exception:  # noqa: BLE001  (a broken optional module must not break the CLI)
        return None, None
    ok = os.path.isfile(os.path.join(d, "config.json")) and os.path.isfile(os.path.join(a, "config.json"))
    return (str(d), str(a)) if ok else (None, None)


def window(text: str):
    """--W: an int window >= 0, or none/off (no dLLM KV cache)."""
    if text.lower() in ("none", "off"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int window or 'none', got {text!r}") from None


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {v}")
    return v


# A short list of what the embedded pair was trained on, for --help (the full
# vocabulary check is apd_ext.tiny.unknown_words).
def _tiny_vocab_help() -> str:
    try:
        from apd_ext.tiny import vocabulary_summary
    except ImportError:
        return ""
    return vocabulary_summary()


def _add_generate(sub) -> None:
    d_def, a_def = _embedded_defaults()
    vocab = _tiny_vocab_help() if d_def else ""
    p = sub.add_parser("generate", help="generate text with APD or a baseline",
                       description="Generate text with APD (or a baseline); the tokenizer comes from "
                       "the dLLM folder. Streams the accepted text, then prints the stats."
                       + (" Without --dllm / --verifier it runs the embedded tiny pair, which " + vocab
                          if vocab else ""))
    p.add_argument("--dllm", default=d_def, required=d_def is None,
                   help="dLLM checkpoint folder (Dream layout)" + (" [embedded tiny dLLM]" if d_def else ""))
    p.add_argument("--verifier", default=a_def,
                   help="AR verifier checkpoint folder (Qwen2 layout)" + (" [embedded tiny AR]" if a_def else ""))
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--method", choices=METHODS, default="apd")
    p.add_argument("--R", type=float, default=_UNSET, help="mixture weight in [0, 1] (apd)" + _DEF["R"])
    p.add_argument("--W", type=window, default=_UNSET,
                   help="recompute window, or 'none' for no dLLM KV cache" + _DEF["W"])
    p.add_argument("--M", type=int, default=_UNSET, help="max masked lookahead (apd, leftright)" + _DEF["M"])
    p.add_argument("--K", type=int, default=1, help="tokens per step (leftright)")
    p.add_argument("--steps", type=positive_int, default=None, help="diffusion steps >= 1 (default: max-new-tokens)")
    p.add_argument("--alg", default="entropy", choices=("origin", "maskgit_plus", "topk_margin", "entropy"),
                   help="diffusion sampler")
    p.add_argument("--acceptance", default="coupled", choices=("coupled", "argmax"))
    p.add_argument("--compat", default=None, choices=("official",), help="reproduce the released code's sampling")
    p.add_argument("--temperature", type=float, default=_UNSET, help="sampling temperature" + _DEF["temperature"])
    p.add_argument("--top-p", type=float, default=_UNSET, help="nucleus mass" + _DEF["top_p"])
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=positive_int, default=_UNSET, help=_DEF["max_new_tokens"].strip())
    p.add_argument("--truncate", action="store_true",
                   help="when prompt + max-new-tokens exceeds the context, generate fewer tokens (with a "
                   "warning) instead of failing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--no-color", action="store_true", help="never colour the streamed blocks")
    p.set_defaults(func=cmd_generate)


# `apd generate`'s defaults: the embedded pair's own (apd_ext.tiny.DEFAULTS) when
# it runs that pair, APDConfig's (the paper's GSM8K setting) for any other.
_UNSET = argparse.SUPPRESS  # a knob not given (W=None is a value: no dLLM KV cache)
GENERIC_DEFAULTS = {"R": 0.7, "W": 16, "M": 100, "temperature": 0.2, "top_p": 0.95, "max_new_tokens": 256}
_DEF = {k: f" [embedded pair: see README; other models: {v}]" for k, v in GENERIC_DEFAULTS.items()}


def _fill_defaults(args, embedded: bool) -> None:
    """Unset knobs take the embedded pair's defaults on it, else the generic ones."""
    if embedded:
        from apd_ext.tiny import DEFAULTS as base
    else:
        base = GENERIC_DEFAULTS
    for k in GENERIC_DEFAULTS:
        if getattr(args, k, _UNSET) is _UNSET:
            setattr(args, k, base[k])


def _device_dtype(args):
    import torch

    from apd_ext._validate import check_device

    device = check_device("--device", args.device)
    name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return device, getattr(torch, name)


def _load_tokenizer(folder: str):
    from apd_ext.tokenization import load_tokenizer

    try:
        return load_tokenizer(folder)
    except Exception as e:  # noqa: BLE001  (transformers raises many types here)
        raise UsageError(f"{folder}: no usable tokenizer (tokenizer.json / tokenizer_config.json): {e}") from e


def _encode(tok, prompt: str, chat: bool) -> List[int]:
    if chat:
        if not getattr(tok, "chat_template", None):
            raise UsageError("--chat: the dLLM's tokenizer has no chat template")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(prompt, add_special_tokens=False)["input_ids"]


class _Streamer:
    """Prints the newly committed text, one colour per step on a TTY.

    The text comes from the incremental detokenizer (apd_ext.output): each
    step decodes only its own ids (plus the previous step's as context), and a
    character split across steps (UTF-8 bytes of a CJK character or an emoji)
    is printed once it is complete, never as U+FFFD and then again.
    generate / generate_leftright: `text` is their text_callback (the Engine's
    output path, the server's streams' detokenizer); generate_ar (no Engine):
    `ids` is its id callback, through its own IncrementalDetokenizer."""

    def __init__(self, tok, eos, colour: bool, stream):
        from apd_ext.output.detokenizer import IncrementalDetokenizer

        self.detok = IncrementalDetokenizer(tok)
        self.eos, self.colour, self.stream = set(eos), colour, stream
        self.blocks = 0

    def text(self, step: int, text_deltas) -> None:
        self._write(text_deltas[0])

    def ids(self, step: int, tokens_accepted) -> None:
        block = [t for t in tokens_accepted[0] if t not in self.eos]
        self._write(self.detok.update(block))

    def finish(self) -> None:
        """ids: print a tail that never completed (as the full decode renders it;
        the text path's last delta already holds it)."""
        self._write(self.detok.finish())

    def _write(self, new: str) -> None:
        if not new:
            return
        if self.colour:
            new = _COLOURS[self.blocks % len(_COLOURS)] + new + _RESET
        self.blocks += 1
        self.stream.write(new)
        self.stream.flush()


def _check_fits(ids: List[int], args, dllm, verifier) -> None:
    """The prompt's ids fit both vocabularies (else the pair disagrees, not the
    prompt) and prompt + --max-new-tokens fits the context (else fail, or with
    --truncate warn and generate what fits)."""
    models = [m for m in (dllm, verifier) if m is not None]
    top = max(ids)
    if dllm is not None and verifier is not None:
        vd, va = dllm.config.vocab_size, verifier.config.vocab_size
        if top < vd and top >= va:
            raise UsageError(f"--dllm / --verifier: the pair does not share a tokenizer: the dLLM's tokenizer "
                             f"encodes the prompt to id {top}, outside the verifier's vocabulary of {va} "
                             f"(the dLLM has {vd}); use a verifier trained with the dLLM's tokenizer")
    ctx = min(int(m.config.max_position_embeddings) for m in models)
    room = ctx - len(ids)
    if room < 1:
        raise UsageError(f"--prompt: {len(ids)} tokens leave no room in the context of {ctx} positions")
    if len(ids) + args.max_new_tokens > ctx:
        msg = (f"prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the context "
               f"of {ctx} positions: at most {room} new tokens fit")
        if not args.truncate:
            raise UsageError(f"--max-new-tokens: {msg}; pass --truncate to generate {room}, or shorten the prompt")
        print(f"apd: warning: {msg}; generating at most {room} (--truncate)", file=sys.stderr)
        args.max_new_tokens = room


def cmd_generate(args) -> int:
    import torch

    import apd_ext
    from apd_ext.config import APDConfig

    if not args.prompt.strip():
        raise UsageError("--prompt: expected some text, got an empty prompt")
    device, dtype = _device_dtype(args)
    if args.method == "apd" and not args.verifier:
        raise UsageError("--verifier: required for --method apd (an AR checkpoint folder)")
    if args.method == "ar" and not args.verifier:
        raise UsageError("--verifier: required for --method ar (the AR model that decodes)")
    from apd_ext.models.config import check_folder

    for flag, folder in (("--dllm", args.dllm), ("--verifier", args.verifier)):
        if folder is not None:  # before the tokenizer: a wrong path is named first
            check_folder(flag, folder, hint="only local folders load (no Hub downloads): see the README, "
                         "'Getting the checkpoints'")
    tok = _load_tokenizer(args.dllm)
    prompt_text = args.prompt
    d_def, _ = _embedded_defaults()
    _fill_defaults(args, d_def is not None and os.path.realpath(args.dllm) == os.path.realpath(d_def))
    if args.chat:
        pass  # the chat template frames the message (the embedded pair's as `Question: ...\nAnswer:\n`)
    elif d_def is not None and os.path.realpath(args.dllm) == os.path.realpath(d_def) and "Answer:" not in prompt_text:
        # The embedded pair is trained on `Question: ...\nAnswer:\n` only; a bare
        # question (or one whose trailing newline a shell `$(...)` ate) is wrapped.
        from apd_ext.tasks.arith import prompt_of

        prompt_text = prompt_of(prompt_text.strip())
    elif d_def is not None and os.path.realpath(args.dllm) == os.path.realpath(d_def):
        prompt_text = prompt_text.rstrip("\n") + "\n"
    if d_def is not None and os.path.realpath(args.dllm) == os.path.realpath(d_def):
        from apd_ext.tiny import unknown_words

        unknown = unknown_words(args.prompt)
        if unknown:
            print(f"apd: warning: the embedded tiny pair was trained on arithmetic word problems only; "
                  f"these words are outside its training vocabulary and the answer will be poor: "
                  f"{', '.join(unknown)} (see `apd demo --help`)", file=sys.stderr)
    ids = _encode(tok, prompt_text, args.chat)
    if not ids:
        raise UsageError("--prompt: the prompt encodes to no tokens")

    dllm = apd_ext.load_model(args.dllm, dtype=dtype, device=device) if args.method != "ar" else None
    verifier = None
    if args.method in ("apd", "ar"):
        verifier = apd_ext.load_model(args.verifier, dtype=dtype, device=device)
    if args.method == "apd":
        # The configs here; the tokenizers in the Engine's pair check (apd_ext.pairs,
        # cached per folder pair), which also finds the ids to ban.
        apd_ext.check_compatible(dllm, verifier)

    _check_fits(ids, args, dllm, verifier)
    ref_model = dllm if dllm is not None else verifier
    eos = list(ref_model.config.eos_token_ids)
    colour = not args.no_color and not args.json and sys.stdout.isatty()
    stream = None if args.json else _Streamer(tok, eos, colour, sys.stdout)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                    max_new_tokens=args.max_new_tokens)
    text_stream = dict(tokenizer=tok, text_callback=stream.text) if stream is not None else {}
    prompt = torch.tensor([ids], dtype=torch.long)
    config = None
    if args.method == "apd":
        config = APDConfig(R=args.R, W=args.W, M=args.M, acceptance=args.acceptance, compat=args.compat,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                           max_new_tokens=args.max_new_tokens, seed=args.seed)
        out = apd_ext.generate(dllm, verifier, prompt, config, **text_stream)
    elif args.method == "leftright":
        out = apd_ext.generate_leftright(dllm, prompt, K=args.K, W=args.W, M=args.M, compat=args.compat,
                                         **sampling, **text_stream)
    elif args.method == "diffusion":
        # tokens land out of order: the text is printed at the end
        steps = args.steps if args.steps is not None else args.max_new_tokens
        out = apd_ext.generate_diffusion(dllm, prompt, steps=steps, alg=args.alg,
                                         **sampling)
    else:
        out = apd_ext.generate_ar(verifier, prompt, callback=stream.ids if stream is not None else None,
                                  **sampling)

    gen = out.generated(0).tolist()
    body = [t for t in gen if t not in set(eos)]
    text = tok.decode(body, skip_special_tokens=True)
    s = out.stats
    if args.json:
        result = {
            "method": args.method,
            "prompt": args.prompt,
            "prompt_tokens": len(ids),
            "text": text,
            "token_ids": gen,
            "num_generated": int(out.num_generated[0]),
            "stopped_at_eos": bool(gen) and gen[-1] in eos,
            "accepted_per_step": out.accepted_per_step[0],
            "stats": s.as_dict(),
            "config": {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
                       "dllm": args.dllm, "verifier": args.verifier,
                       **({"apd": vars(config)} if config is not None else {})},
        }
        print(json.dumps(result))
        return 0
    if stream is None or args.method == "diffusion":
        sys.stdout.write(text)
    else:
        stream.finish()
    per_step = s.generated_tokens / s.steps if s.steps else 0.0
    print()
    print(f"--- {args.method}: {s.generated_tokens} tokens in {s.steps} steps ({per_step:.2f} tokens/step), "
          f"{s.seconds:.3f} s, {s.tokens_per_second:.1f} tokens/s")
    print(f"    dLLM {s.dllm_seconds:.3f} s ({s.dllm_forwards} forwards), verifier {s.verifier_seconds:.3f} s "
          f"({s.verifier_forwards} forwards), sampling {s.sampling_seconds:.3f} s; "
          f"{device}, {str(dtype).replace('torch.', '')}")
    return 0


def _add_serve(sub) -> None:
    """`apd serve`: the Ray Serve deployment (apd_ext.serve.ray_app)."""
    from apd_ext.serve import ray_app

    d_def, a_def = _embedded_defaults()
    p = sub.add_parser("serve", help="serve APD over HTTP (OpenAI-style completions on Ray Serve)",
                       description="Start Ray Serve replicas (one APD Engine each) behind an OpenAI-style "
                       "HTTP API; binds 127.0.0.1 unless --host says otherwise. Runs until Ctrl-C.")
    ray_app.add_arguments(p, d_def, a_def)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from apd_ext.serve import ray_app

    need = missing_extra("serve")
    if need:
        raise UsageError(f"apd serve: {need}")
    return ray_app.cmd_serve(args)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="end-to-end APD step benchmark (ours vs the reference loop)",
                       description="Times APD steps and whole generations on random weights with a fixed "
                       "acceptance schedule, ours against the transformers reference loop and the "
                       "baselines; writes a CSV and a plot.")
    from apd_ext.decoding import bench

    bench.add_arguments(p)
    p.add_argument("--csv", default="apd_bench.csv", help="CSV output file")
    p.add_argument("--plot", default="apd_bench.png", help="plot output file (needs matplotlib)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from apd_ext.decoding import bench

    rows = bench.run(args, progress=True)
    bench.print_table(rows, args)
    bench.write_csv(rows, args.csv)
    print(f"wrote {args.csv}")
    if bench.plot(rows, args.plot):
        print(f"wrote {args.plot}")
    else:
        print(f"no plot: {missing_extra('plot')}")
    return 0


def _lazy(module: str):
    """A subcommand whose implementation lives in an optional module with main(argv)."""

    def run(argv: List[str]) -> int:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise UsageError(f"this command needs {module}, which is not installed ({e}); "
                             "the embedded tiny models ship with the full apd-ext package") from e
        return int(mod.main(argv) or 0)

    return run


def _add_check_pair(sub) -> None:
    p = sub.add_parser("check-pair", help="check that a dLLM and a verifier can run APD together",
                       description="Read both folders' configs and tokenizers and report the shared id range, "
                                   "ids in one model only, special-token collisions, the EOS sets, the mask id "
                                   "and the chat templates. Verdict: compatible; compatible with banned ids "
                                   "(never drafted, never accepted); or incompatible (exit status 1).")
    p.add_argument("dllm", metavar="DLLM", help="the diffusion LLM's checkpoint folder")
    p.add_argument("verifier", metavar="VERIFIER", help="the AR verifier's checkpoint folder")
    p.set_defaults(func=_cmd_check_pair)


def _cmd_check_pair(args) -> int:
    from apd_ext.pairs import check_pair

    report = check_pair(args.dllm, args.verifier)
    print(report.format())
    return 0 if report.compatible else 1


_LAZY = {
    "demo": ("apd_ext.tiny.demo", "APD on the embedded tiny model pair"),
    "sweep": ("apd_ext.tiny.sweep", "sweep R / W / M on the embedded tiny model pair"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="apd", description="Adaptive Parallel Decoding for diffusion LLMs.")
    sub = ap.add_subparsers(dest="command", metavar="{generate,serve,bench,check-pair,demo,sweep}")
    _add_generate(sub)
    _add_serve(sub)
    _add_bench(sub)
    _add_check_pair(sub)
    for name, (_, help_) in _LAZY.items():
        sub.add_parser(name, help=help_, add_help=False)
    return ap


def _quiet_transformers() -> None:
    """transformers warns when AutoTokenizer reads a Dream config.json it does not
    know, and about deprecated config fields: noise for a command-line user."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_transformers()
    try:
        if argv and argv[0] in _LAZY:  # the module parses its own arguments
            return _lazy(_LAZY[argv[0]][0])(argv[1:])
        ap = build_parser()
        args = ap.parse_args(argv)
        if not getattr(args, "func", None):
            ap.print_help()
            return 2
        return args.func(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError, NotADirectoryError) as e:
        if os.environ.get("APD_DEBUG"):
            raise
        print(f"apd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def lm_eval_main() -> int:
    """The `apd-lm-eval` console script: lm-eval's CLI with model "apd", or one
    line naming the eval extra when lm-eval is not installed."""
    need = missing_extra("lm-eval")
    if need:
        print(f"apd-lm-eval: error: {need}", file=sys.stderr)
        return 2
    from apd_ext.integrations.lm_eval import main as _lm_eval_main

    return _lm_eval_main()


if __name__ == "__main__":  # `python -m apd_ext.cli` (UsageError is errors.py's, one class either way)
    sys.exit(main())
