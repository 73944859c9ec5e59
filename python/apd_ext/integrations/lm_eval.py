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

Likelihoods (lm-eval's TemplateLM does the context / continuation split as its
HF model: encode context + continuation together, split at the context's
length, trailing context whitespace moved to the continuation):

- ``method=ar``: exact, through the verifier alone, as HFLM scores a causal LM
  (``loglikelihood_rolling``: lm-eval's disjoint rolling windows of max_length).
- ``apd``, ``leftright``, ``diffusion``: the dLLM's Monte-Carlo estimate as
  Dream's own evaluation code computes it (DreamLM/Dream, eval/eval.py,
  ``nll_type=mc``, ``log_type=ftb``; see :func:`dream_mc_nll`), ``mc_num``
  samples per request, seeded by ``seed`` + request index. It estimates a lower
  bound (the masked-diffusion ELBO), not the exact log-likelihood; ``is_greedy``
  is always False (as Dream's), and there is no rolling likelihood.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as _e:  # the eval extra is not installed
    _NEED = "apd_ext.integrations.lm_eval needs lm_eval, which is not installed: pip install 'apd-ext[eval]'"
    if __name__ == "__main__":  # `python -m apd_ext.integrations.lm_eval`: one line, no traceback
        sys.exit(f"apd: error: {_NEED}")
    raise ImportError(_NEED) from _e
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

METHODS = ("apd", "leftright", "diffusion", "ar")
# Request gen_kwargs this model understands (after lm-eval's normalize_gen_kwargs).
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dream's eval: mask ratio t ~ U[0, 1] mapped to (1 - eps) t + eps (its sampling_eps).
MC_EPS = 1e-3
# Rows of [V] logits one forward may return (fp32: 256 x 152064 x 4 B = 156 MB),
# and token rows one forward may run: bounds the memory of a likelihood batch.
_LOGIT_ROWS = 256
_TOKEN_ROWS = 16384

# Stats of the most recently built model's requests: read by main() to write them
# next to lm-eval's results (the CLI builds the model itself, out of our reach).
_LAST: List["APDLM"] = []


def task_dir(name: str = "apd_arith") -> Path:
    """The folder of a shipped task, ``apd_arith`` or ``apd_arith_mc`` (``--tasks <dir>/<name>.yaml``)."""
    return Path(__file__).resolve().parent / "tasks" / name


def dream_mask_draws(generator: torch.Generator, n: int, T: int, eps: float = MC_EPS):
    """Dream's forward noising of the continuation, n samples of T positions.

    As Dream's ``_forward_process``: one u0 ~ U[0, 1), ratios t_i = (u0 + i / n)
    mod 1 (stratified over the n samples, Kingma et al. 2021 App. I.1),
    p_i = (1 - eps) t_i + eps, then every position masked independently with
    probability p_i. Dream stratifies within each forward batch of batch_size
    rows; here over all n samples of a request, so batching never changes a value.
    -> (mask [n, T] bool, p [n] float64), drawn on the CPU from ``generator``.
    """
    u0 = torch.rand(1, generator=generator, dtype=torch.float64)
    t = (u0 + torch.arange(n, dtype=torch.float64) / n) % 1.0  # [n]
    p = (1.0 - eps) * t + eps  # [n]
    mask = torch.rand(n, T, generator=generator, dtype=torch.float64) < p[:, None]  # [n, T]
    return mask, p


@torch.no_grad()
def masked_nll(dllm, seq: List[int], first: int, mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per sample, sum over masked positions of -log p_dLLM(token) / p (Dream's weighting).

    seq: the full sequence (context + continuation + EOS); positions
    [first, first + T) are the scored ones and mask [n, T] says which of them
    are replaced by [MASK] in sample i (p [n]: its mask ratio). Each sample is
    one bidirectional dLLM forward over the whole sequence; the logits are read
    shifted (row j - 1 predicts position j), as Dream does. Samples with no
    masked position add 0 and cost no forward. -> [n] float64.
    """
    n, T = mask.shape
    L = len(seq)
    if not 1 <= first <= L - T:
        raise ValueError(f"first: expected in [1, {L - T}], got {first}")
    dev = dllm.device
    mask_id = int(dllm.config.mask_token_id)
    ids = torch.tensor(seq, dtype=torch.long, device=dev)  # [L]
    target = ids[first:first + T]  # [T]
    out = torch.zeros(n, dtype=torch.float64)
    rows = mask.any(1).nonzero().flatten()  # samples with something to score
    chunk = max(1, min(_TOKEN_ROWS // L, _LOGIT_ROWS // T))
    for s in range(0, rows.numel(), chunk):
        r = rows[s:s + chunk]  # [B]
        B = r.numel()
        m = mask[r].to(dev)  # [B, T]
        toks = ids.expand(B, L).clone()  # [B, L]
        toks[:, first:first + T] = torch.where(m, mask_id, target)
        zero = torch.zeros(B, dtype=torch.long, device=dev)
        logits = dllm.forward(toks, dllm.new_cache(B, L), zero, zero + L,
                              logit_rows=(zero + first - 1, T)).float()  # [B, T, V]
        lp = logits.gather(-1, target.expand(B, T)[..., None]).squeeze(-1) - logits.logsumexp(-1)  # [B, T]
        out[r] = (-(lp.double() * m).sum(1)).cpu() / p[r]
    return out


def dream_mc_nll(dllm, context: List[int], continuation: List[int], eos: int, *, mc_num: int,
                 generator: torch.Generator, max_length: int, eps: float = MC_EPS) -> float:
    """Dream's Monte-Carlo estimate of -log p(continuation | context) (an upper bound on the NLL).

    DreamLM/Dream eval/eval.py (``_eval_target_nll_mc``, ``log_type='ftb'``):
    the sequence is context + continuation + EOS, cut on the left to
    max_length; the continuation alone is noised (:func:`dream_mask_draws`),
    position 0 and the final EOS never; the estimate is the mean over mc_num
    samples of :func:`masked_nll`.
    """
    seq = (list(context) + list(continuation) + [eos])[-max_length:]
    L = len(seq)
    first = max(L - 1 - len(continuation), 1)
    T = L - 1 - first
    if T <= 0:
        return 0.0
    mask, p = dream_mask_draws(generator, mc_num, T, eps)
    return float(masked_nll(dllm, seq, first, mask, p).mean())


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


class APDLM(TemplateLM):
    """lm-eval LM over a dLLM (and, for method apd, its AR verifier) loaded with apd_ext.load_model.

    dllm / verifier: checkpoint folders (verifier needed for method apd and ar;
    ar decodes with the verifier alone). tokenizer: folder of the tokenizer
    (default: the dLLM's folder, also for method ar). R, W (None: no dLLM KV cache), M, acceptance,
    compat: APDConfig fields; K: tokens per step of leftright; steps, alg: the
    diffusion sampler. temperature / top_p / top_k: when given they override the
    task's gen_kwargs; otherwise do_sample=False means greedy and do_sample=True
    takes the task's temperature / top_p / top_k. seed: request i (in lm-eval's
    order) uses seed + i, so batching never changes a text or an estimate.
    batch_size: prompts per generate call, sequences per ar likelihood forward.
    mc_num: Monte-Carlo samples per dLLM loglikelihood request (Dream's 128).
    stats_path: a JSONL file of per-request stats.
    model_args win over the CLI's --batch_size / --device.
    """

    def __init__(self, dllm=None, verifier=None, tokenizer=None, method: str = "apd",
                 R: float = 0.7, W=16, M: int = 100, K: int = 1, steps=None, alg: str = "entropy",
                 acceptance: str = "coupled", compat=None, temperature=None, top_p=None, top_k=None,
                 seed: int = 0, dtype: str = "bfloat16", device: str = "cuda", batch_size=8,
                 max_batch_size=None, cuda_graphs: bool = False, max_gen_toks: int = 256,
                 max_length=None, mc_num: int = 128, stats_path=None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"model_args: unknown argument(s) {sorted(unknown)} for model 'apd'")
        import apd_ext
        from apd_ext.tokenization import load_tokenizer

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
        self.mc_num = _arg("mc_num", mc_num, int, 1)
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
        self.tokenizer = load_tokenizer(tok_dir)
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

    @property
    def eot_token_id(self) -> int:
        return self._eos()

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> List[int]:
        # As generate_until's prompts: no special tokens (the Qwen tokenizers add none anyway).
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation), context ids, continuation ids), from
        TemplateLM.loglikelihood. -> (log-likelihood, is_greedy) per request."""
        pairs = [(list(c), list(x)) for _, c, x in requests]
        for i, (_, x) in enumerate(pairs):
            if len(x) > self.max_length:
                raise ValueError(f"loglikelihood: request {i}'s continuation has {len(x)} tokens, more than "
                                 f"the model's max_length {self.max_length}")
        if self.method == "ar":
            res = self._ar_scores(pairs)
        else:
            from tqdm import tqdm

            res = []
            for i, (c, x) in enumerate(tqdm(pairs, desc=f"Dream MC loglikelihood ({self.mc_num} samples)",
                                            disable=disable_tqdm)):
                gen = torch.Generator().manual_seed(self.seed + i)
                nll = dream_mc_nll(self.dllm, c, x, self._eos(), mc_num=self.mc_num, generator=gen,
                                   max_length=self.max_length)
                res.append((-nll, False))  # Dream's eval reports no greedy flag
        for (args, _, _), r in zip(requests, res):
            if args is not None:
                self.cache_hook.add_partial("loglikelihood", args, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Exact for method ar: lm-eval's disjoint rolling windows of max_length
        (context_len 1, the EOT token first), as HFLM; summed per request."""
        if self.method != "ar":
            raise NotImplementedError(
                f"model 'apd' method {self.method!r}: no loglikelihood_rolling (Dream's Monte-Carlo estimator "
                "scores a continuation given a context only); use method=ar")
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        out = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._ar_scores(windows)):
            out[i] += ll
        for r, ll in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, ll)
        return out

    @torch.no_grad()
    def _ar_scores(self, pairs) -> List[tuple]:
        """Exact (sum log p, is_greedy) of each continuation under the verifier, as HFLM:
        input (context + continuation)[-(max_length + 1):][:-1], the last len(continuation)
        logits rows. Longest first, batch_size sequences (and at most _LOGIT_ROWS logits rows) a forward."""
        model, dev = self.verifier, self._device
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        res: List[Optional[tuple]] = [None] * len(pairs)
        k = 0
        while k < len(order):
            batch = [order[k]]
            while (k + len(batch) < len(order) and len(batch) < self.batch_size and
                   (len(batch) + 1) * max(len(pairs[j][1]) for j in batch + [order[k + len(batch)]]) <= _LOGIT_ROWS):
                batch.append(order[k + len(batch)])
            k += len(batch)
            inps = [(pairs[j][0] + pairs[j][1])[-(self.max_length + 1):][:-1] for j in batch]
            conts = [pairs[j][1] for j in batch]
            n_rows = max(1, max(len(x) for x in conts))
            starts = [len(p) - len(x) for p, x in zip(inps, conts)]
            Lw = max(s for s in starts) + n_rows  # every row's [start, start + n_rows) inside the window
            B = len(batch)
            ids = torch.zeros(B, Lw, dtype=torch.long)  # [B, Lw], right-padded
            for b, p in enumerate(inps):
                ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
            q_len = torch.tensor([len(p) for p in inps], device=dev)  # [B]
            logits = model.forward(ids.to(dev), model.new_cache(B, Lw), torch.zeros_like(q_len), q_len,
                                   logit_rows=(torch.tensor(starts, device=dev), n_rows)).float()  # [B, n_rows, V]
            logp = torch.log_softmax(logits, dim=-1)
            for b, (j, x) in enumerate(zip(batch, conts)):
                tok = torch.tensor(x, dtype=torch.long, device=dev)  # [n]
                lp = logp[b, :len(x)]  # [n, V]
                ll = float(lp.gather(-1, tok[:, None]).sum())
                res[j] = (ll, bool((lp.argmax(-1) == tok).all()))
        return res

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
    """lm-eval's CLI with model 'apd' registered and the shipped tasks (apd_arith,
    apd_arith_mc) on its include path; per-request stats next to the results."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    out = None
    for i, a in enumerate(argv):
        if a in ("--output_path", "-o") and i + 1 < len(argv):
            out = argv[i + 1]
        elif a.startswith("--output_path="):
            out = a.split("=", 1)[1]
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        # The shipped tasks by name (--tasks apd_arith_mc): the model is registered
        # already, so lm-eval may resolve task names after building it.
        argv += ["--include_path", str(task_dir().parent)]
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
