"""lm-evaluation-harness model ``"apd"``: APD (or a baseline) behind lm-eval's LM API.

lm-eval 0.4.x finds models only in its registry (``@register_model``); it
reads no plugin entry points for models and ``--include_path`` adds task
folders only. So the model is registered when this module is imported, which
happens without any user code in two ways:

- ``python -m apd_ext.integrations.lm_eval <lm_eval arguments>``: lm-eval's own
  CLI (``lm_eval run``'s arguments) with the model registered; it also writes
  the per-request stats next to lm-eval's results under ``--output_path``;
- ``lm_eval --model apd --tasks <path>/apd_arith.yaml``: the shipped task file's
  ``utils.py`` imports this module, and lm-eval resolves a task *file* before
  it builds the model (:func:`task_dir` gives the folder).

``--model_args dllm=DIR,verifier=DIR,R=0.7,W=16,M=100,dtype=bfloat16,device=cuda,batch_size=8,cuda_graphs=True``;
``method=apd|leftright|diffusion|ar`` picks apd_ext.generate,
generate_leftright, generate_diffusion or generate_ar. Generation text is cut
at the ``until`` stop strings exactly as lm-eval's HF model does (decode with
special tokens skipped, then lm-eval's own ``postprocess_generated_text``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

METHODS = ("apd", "leftright", "diffusion", "ar")
# Request gen_kwargs this model understands (after lm-eval's normalize_gen_kwargs).
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Stats of the most recently built model's requests: read by main() to write them
# next to lm-eval's results (the CLI builds the model itself, out of our reach).
_LAST: List["APDLM"] = []


def task_dir() -> Path:
    """The folder of the shipped ``apd_arith`` task (``--include_path`` or ``--tasks <dir>/apd_arith.yaml``)."""
    return Path(__file__).resolve().parent / "tasks" / "apd_arith"


def _arg(name: str, value, kind, lo=None, allow_none: bool = False):
    """lm-eval parses model_args strings into bool/int/float/None; check one of them."""
    if value is None and allow_none:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        want = kind.__name__ + (" or None" if allow_none else "")
        raise ValueError(f"model_args {name}: expected {want}, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"model_args {name}: expected >= {lo}, got {value!r}")
    return value


class APDLM(LM):
    """lm-eval LM over a dLLM (and, for method apd, its AR verifier) loaded with apd_ext.load_model.

    dllm / verifier: checkpoint folders (verifier needed for method apd and ar;
    ar decodes with the verifier alone). tokenizer: folder of the tokenizer
    (default: the dLLM's folder, also for method ar). R, W (None: no dLLM KV cache), M, acceptance,
    compat: APDConfig fields; K: tokens per step of leftright; steps, alg: the
    diffusion sampler. temperature / top_p / top_k: when given they override the
    task's gen_kwargs; otherwise do_sample=False means greedy and do_sample=True
    takes the task's temperature / top_p / top_k. seed: request i (in lm-eval's
    order) uses seed + i, so batching never changes a text. batch_size: prompts
    per generate call. stats_path: a JSONL file of per-request stats.
    model_args win over the CLI's --batch_size / --device.
    """

    def __init__(self, dllm=None, verifier=None, tokenizer=None, method: str = "apd",
                 R: float = 0.7, W=16, M: int = 100, K: int = 1, steps=None, alg: str = "entropy",
                 acceptance: str = "coupled", compat=None, temperature=None, top_p=None, top_k=None,
                 seed: int = 0, dtype: str = "bfloat16", device: str = "cuda", batch_size=8,
                 max_batch_size=None, cuda_graphs: bool = False, max_gen_toks: int = 256,
                 max_length=None, stats_path=None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"model_args: unknown argument(s) {sorted(unknown)} for model 'apd'")
        import apd_ext
        from transformers import AutoTokenizer

        if method not in METHODS:
            raise ValueError(f"model_args method: expected one of {list(METHODS)}, got {method!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"model_args dtype: expected one of {list(_DTYPES)}, got {dtype!r}")
        need = {"apd": ("dllm", "verifier"), "leftright": ("dllm",), "diffusion": ("dllm",), "ar": ("verifier",)}
        for name in need[method]:
            folder = {"dllm": dllm, "verifier": verifier}[name]
            if not isinstance(folder, str) or not os.path.isdir(folder):
                raise ValueError(f"model_args {name}: method {method!r} needs a local checkpoint folder, "
                                 f"got {folder!r}")
        if batch_size == "auto" or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            raise ValueError("model_args batch_size: 'auto' is not supported by model 'apd'; give an int")
        if isinstance(batch_size, str) and batch_size.isdigit():
            batch_size = int(batch_size)  # the CLI's --batch_size arrives as a string
        self.batch_size = _arg("batch_size", batch_size, int, 1)
        self.method = method
        self.W = _arg("W", W, int, 1, allow_none=True)
        self.K = _arg("K", K, int, 1)
        self.steps = _arg("steps", steps, int, 1, allow_none=True)
        if method == "diffusion" and self.steps is None:
            raise ValueError("model_args steps: method 'diffusion' needs steps (an int >= 1)")
        self.alg = alg
        self.seed = _arg("seed", seed, int, 0)
        self.max_gen_toks = _arg("max_gen_toks", max_gen_toks, int, 1)
        self.cuda_graphs = _arg("cuda_graphs", cuda_graphs, bool)
        self.sampling = {k: v for k, v in (("temperature", _arg("temperature", temperature, float, 0.0, True)),
                                          ("top_p", _arg("top_p", top_p, float, 0.0, True)),
                                          ("top_k", _arg("top_k", top_k, int, 0, True))) if v is not None}
        # Validates R, M, acceptance, compat with APDConfig's own messages.
        self.config = apd_ext.APDConfig(R=_arg("R", R, float), W=self.W, M=_arg("M", M, int, 1),
                                        acceptance=acceptance, compat=compat, seed=self.seed)
        dt = _DTYPES[dtype]
        self.dllm = apd_ext.load_model(dllm, dtype=dt, device=device) if "dllm" in need[method] else None
        self.verifier = apd_ext.load_model(verifier, dtype=dt, device=device) if "verifier" in need[method] else None
        self._device = torch.device(device)
        # The dLLM's folder first, even for method ar: transformers >= 5 forces its
        # digit-splitting Qwen2Tokenizer on any model_type "qwen2" folder (see apd_ext.tiny).
        tok_dir = tokenizer or dllm or verifier
        if not isinstance(tok_dir, str) or not os.path.isdir(tok_dir):
            raise ValueError(f"model_args tokenizer: expected a local tokenizer folder, got {tok_dir!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        self._tok_dir = tok_dir
        model = self.dllm if self.dllm is not None else self.verifier
        self.max_length = _arg("max_length", max_length, int, 2, allow_none=True) or \
            model.config.max_position_embeddings
        self.stats_path = stats_path
        self.request_stats: List[dict] = []
        _LAST[:] = [self]

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
        # The CLI always passes batch_size (default 1) and device; let model_args win
        # instead of lm-eval's "got multiple values for keyword argument".
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # ------------------------------------------------------------------ lm-eval API

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "model 'apd' has no loglikelihood: a diffusion LLM gives no exact sequence likelihood; "
            "use generate_until tasks (output_type: generate_until)")

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError(
            "model 'apd' has no loglikelihood_rolling: a diffusion LLM gives no exact sequence likelihood; "
            "use generate_until tasks (output_type: generate_until)")

    @property
    def tokenizer_name(self) -> str:
        return self._tok_dir.replace("/", "__")

    def chat_template(self, chat_template=False) -> Optional[str]:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"--apply_chat_template: the tokenizer in {self._tok_dir} has no chat template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        """Aggregate stats, stored by lm-eval in the results file's "config"."""
        n = len(self.request_stats)
        toks = sum(s["generated_tokens"] for s in self.request_stats)
        steps = sum(s["steps"] for s in self.request_stats)
        secs = sum(s["batch_seconds"] / s["batch_size"] for s in self.request_stats)
        return {"apd_method": self.method, "apd_config": self.config.__dict__ | {"K": self.K},
                "apd_requests": n, "apd_generated_tokens": toks,
                "apd_tokens_per_step": toks / steps if steps else 0.0,
                "apd_tokens_per_second": toks / secs if secs else 0.0}

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        args = [r.args for r in requests]
        order = {id(a): i for i, a in enumerate(args)}  # lm-eval's request index -> seed offset
        re_ord = Collator(args, sort_fn=lambda a: (-len(a[0]), a[0]), group_by="gen_kwargs",
                          group_fn=lambda a: a[1])
        eos = self.tokenizer.decode([self._eos()], skip_special_tokens=False)
        res = []
        for chunk in re_ord.get_batched(n=self.batch_size):
            contexts, kw = [c for c, _ in chunk], chunk[0][1]
            kwargs = normalize_gen_kwargs(kw, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            bad = set(kwargs) - _GEN_KEYS
            if bad:
                raise ValueError(f"gen_kwargs: model 'apd' does not support {sorted(bad)}; "
                                 f"it takes {sorted(_GEN_KEYS)}")
            sampling = self._sampling(kwargs)
            seeds = [self.seed + order[id(a)] for a in chunk]
            prompts = [self._encode(c, max_new) for c in contexts]
            # until goes into the Engine's output path: a request stops at the step
            # that produces one (not at EOS / the budget); the text is cut below.
            ids, batch_secs, steps = self._run(prompts, seeds, max_new, sampling, until)
            toks = sum(len(g) for g in ids)
            for a, p, gen, st, seed in zip(chunk, prompts, ids, steps, seeds):
                text = self.tokenizer.decode(gen, skip_special_tokens=True)
                s = postprocess_generated_text(text, until, None)
                # The loop times whole batches, so tokens/s is the request's batch's rate.
                self.request_stats.append({"request": order[id(a)], "seed": seed, "prompt_tokens": p.numel(),
                                           "generated_tokens": len(gen), "steps": st,
                                           "tokens_per_step": len(gen) / st if st else 0.0,
                                           "batch_size": len(prompts), "batch_seconds": batch_secs,
                                           "batch_tokens_per_second": toks / batch_secs if batch_secs else 0.0})
                res.append(s)
                self.cache_hook.add_partial("generate_until", a, s)
        if self.stats_path:
            self.write_stats(self.stats_path)
        return re_ord.get_original(res)

    # ------------------------------------------------------------------ helpers

    def _eos(self) -> int:
        model = self.dllm if self.dllm is not None else self.verifier
        ids = model.config.eos_token_ids or [self.tokenizer.eos_token_id]
        return ids[0]

    def _sampling(self, kwargs: dict) -> dict:
        if kwargs.get("do_sample"):
            out = {"temperature": float(kwargs.get("temperature", 1.0)), "top_p": float(kwargs.get("top_p", 1.0)),
                   "top_k": int(kwargs.get("top_k", 0) or 0)}
        else:
            out = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
        out.update(self.sampling)
        return out

    def _encode(self, context: str, max_new: int) -> torch.Tensor:
        ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        keep = self.max_length - max_new
        if keep < 1:
            raise ValueError(f"max_gen_toks: {max_new} leaves no room for a prompt in the "
                             f"model's {self.max_length} positions")
        return torch.tensor(ids[-keep:], dtype=torch.long)  # left-truncated, as lm-eval's HF model does

    def _run(self, prompts, seeds, max_new, sampling, until=None):
        """-> generated ids per prompt (up to and including EOS), seconds of the batch, steps per prompt."""
        import apd_ext

        common = dict(max_new_tokens=max_new, **sampling)
        if self.method == "diffusion":
            outs = [apd_ext.generate_diffusion(self.dllm, p[None], self.steps, self.alg, seed=s, **common)
                    for p, s in zip(prompts, seeds)]
            secs = sum(o.stats.seconds for o in outs)
            return ([o.generated(0).tolist() for o in outs], secs,
                    [len(o.accepted_per_step[0]) or self.steps for o in outs])
        if self.method == "apd":
            out = apd_ext.generate(self.dllm, self.verifier, prompts, self.config, seeds=seeds,
                                   cuda_graphs=self.cuda_graphs, stop_strings=until or None,
                                   tokenizer=self.tokenizer, **common)
        elif self.method == "leftright":
            out = apd_ext.generate_leftright(self.dllm, prompts, K=self.K, W=self.W, M=self.config.M,
                                             compat=self.config.compat, seeds=seeds,
                                             cuda_graphs=self.cuda_graphs, stop_strings=until or None,
                                             tokenizer=self.tokenizer, **common)
        else:
            out = apd_ext.generate_ar(self.verifier, prompts, seeds=seeds, **common)
        n = len(prompts)
        return ([out.generated(b).tolist() for b in range(n)], out.stats.seconds,
                [out.sequence_stats(b)["steps"] for b in range(n)])

    def write_stats(self, path) -> Path:
        """Per-request stats as JSONL (one line per generate_until request)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for s in sorted(self.request_stats, key=lambda s: s["request"]):
                f.write(json.dumps(s) + "\n")
        return path


if __name__ != "__main__":
    # Run as `python -m`, this file is __main__ and main() below imports it again under
    # its own name; registering both classes would be a duplicate "apd".
    register_model("apd")(APDLM)


def _results_file(output_path: str, since: float) -> Optional[Path]:
    """The results_*.json lm-eval wrote under output_path after `since`, newest first."""
    root = Path(output_path)
    cands = [root] if root.suffix == ".json" else list(root.rglob("results_*.json"))
    cands = [p for p in cands if p.is_file() and p.stat().st_mtime >= since]
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def stats_next_to_results(lm: "APDLM", output_path: str, since: float) -> Optional[Path]:
    """Write lm's per-request stats as apd_stats_<timestamp>.jsonl beside the newest
    results_<timestamp>.json lm-eval wrote under output_path after `since`."""
    res = _results_file(output_path, since)
    if res is None:
        return None
    return lm.write_stats(res.with_name("apd_stats_" + res.name[len("results_"):-len(".json")] + ".jsonl"))


def main(argv: Optional[List[str]] = None) -> int:
    """lm-eval's CLI with model 'apd' registered; per-request stats next to the results."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    out = None
    for i, a in enumerate(argv):
        if a in ("--output_path", "-o") and i + 1 < len(argv):
            out = argv[i + 1]
        elif a.startswith("--output_path="):
            out = a.split("=", 1)[1]
    t0 = time.time() - 1.0
    old = sys.argv
    sys.argv = ["lm_eval"] + argv
    try:
        cli_evaluate()
    finally:
        sys.argv = old
    if out and _LAST and _LAST[0].request_stats:
        stats = stats_next_to_results(_LAST[0], out, t0)
        if stats is not None:
            print(f"apd: per-request stats in {stats}")
    return 0


if __name__ == "__main__":
    from apd_ext.integrations import lm_eval as _registered  # the module-level class, registered

    raise SystemExit(_registered.main())
