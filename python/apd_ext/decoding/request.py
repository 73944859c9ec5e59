"""A request of the Engine and its checks (the input processing: everything
add_request refuses is refused here, naming the field; a request that passes
is never refused later)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Hashable, Optional

import torch

from apd_ext._validate import fail
from apd_ext.config import APDConfig
from apd_ext.decoding.inputs import check_token_ids, resolve_eos
from apd_ext.output.stops import RequestText, check_stop_strings

_CONFIG_FIELDS = tuple(f.name for f in fields(APDConfig))
PARAM_FIELDS = _CONFIG_FIELDS + ("stop_token_ids", "stop", "logprobs")
MAX_LOGPROBS = 20  # top alternatives per token at most (OpenAI's limit)


@dataclass
class Request:
    request_id: Hashable
    prompt: torch.Tensor  # [P] int64, CPU
    cfg: APDConfig
    stop: tuple  # stop token ids
    total: int  # prompt + budget, capped at the context: the KV positions it reserves
    stops: tuple = ()  # stop strings (host-side, apd_ext.output)
    text: Optional[RequestText] = None  # the output path, with an Engine tokenizer
    logprobs: Optional[int] = None  # top alternatives per token to return; None: no logprobs

    def __post_init__(self):
        self.stop_set = frozenset(self.stop)  # the step's stop test, without a Python loop over tokens


class RequestChecker:
    """The Engine's request checks. config: the defaults (config.M is the
    largest lookahead); models: the pair (the ids must fit each vocabulary);
    context: the models' smallest; max_len / kv_budget: the engine's limits;
    tokenizer: the engine's, or None (then no stop strings)."""

    def __init__(self, config: APDConfig, dllm, models, context: int, max_len: int, kv_budget: int, tokenizer):
        self.config, self.dllm, self.models = config, dllm, models
        self.context, self.max_len, self.kv_budget, self.tokenizer = context, max_len, kv_budget, tokenizer
        self.default_stop = tuple(resolve_eos(dllm, None))

    def __call__(self, prompt_ids, params=None) -> Request:
        prompt = self._prompt(prompt_ids)
        cfg, stop, stops, logprobs = self._params(params)
        P = prompt.numel()
        total = min(P + cfg.max_new_tokens, self.context)
        if P >= self.max_len:
            fail("prompt_ids", f"a prompt shorter than the engine's max_len ({self.max_len} positions, "
                 "one left to generate)", f"{P} tokens")
        if total > self.max_len:
            fail("max_new_tokens", f"at most {self.max_len - P} for this {P}-token prompt (max_len "
                 f"{self.max_len})", cfg.max_new_tokens)
        if total > self.kv_budget:
            fail("max_new_tokens", f"prompt + max_new_tokens within the KV budget ({self.kv_budget} tokens)",
                 cfg.max_new_tokens)
        return Request(None, prompt, cfg, stop, total, stops, logprobs=logprobs)

    def _prompt(self, prompt_ids) -> torch.Tensor:
        p = prompt_ids
        if isinstance(p, torch.Tensor):
            if p.dim() != 1 or p.dtype not in (torch.int64, torch.int32):
                fail("prompt_ids", "a 1-D int tensor of token ids", f"shape {list(p.shape)} dtype {p.dtype}")
            p = p.detach().to("cpu", torch.int64)
        elif isinstance(p, (list, tuple)):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in p):
                fail("prompt_ids", "a list of int token ids", "non-int entries")
            p = torch.tensor(list(p), dtype=torch.int64)
        else:
            raise TypeError(f"prompt_ids: expected a 1-D LongTensor or a list of ints, got {type(p).__name__}")
        if p.numel() == 0:
            fail("prompt_ids", "a prompt of at least one token", "an empty prompt")
        check_token_ids("prompt_ids", p, self.models)
        return p.contiguous()

    def _params(self, params):
        stop, stops, logprobs = self.default_stop, (), None
        if params is None:
            cfg = self.config
        elif isinstance(params, APDConfig):
            cfg = params
        elif isinstance(params, dict):
            unknown = sorted(set(params) - set(PARAM_FIELDS))
            if unknown:
                fail(f"params[{unknown[0]!r}]", f"one of {list(PARAM_FIELDS)}", "an unknown field")
            over = dict(params)
            if over.get("stop_token_ids", None) is not None:
                stop = tuple(resolve_eos(self.dllm, over["stop_token_ids"]))
            over.pop("stop_token_ids", None)
            stops = check_stop_strings(over.pop("stop", None))
            logprobs = over.pop("logprobs", None)
            if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                         or not 0 <= logprobs <= MAX_LOGPROBS):
                fail("logprobs", f"None or an int in [0, {MAX_LOGPROBS}] (top alternatives per token)", logprobs)
            if stops and self.tokenizer is None:
                fail("stop", "an Engine built with tokenizer=... (stop strings are matched on the text)",
                     repr(list(stops)))
            cfg = self.config.replace(**over)
        else:
            raise TypeError(f"params: expected None, an APDConfig or a dict, got {type(params).__name__}")
        if cfg.M > self.config.M:
            fail("M", f"at most the engine's M ({self.config.M})", cfg.M)
        return cfg, stop, stops, logprobs
