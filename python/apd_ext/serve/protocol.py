"""The OpenAI-style request bodies the server accepts, checked field by field.

Every problem raises BadRequest naming the field (the server answers 400 with
{"error": {"message", "type": "invalid_request_error", "param": field}}).

What stock clients send is accepted:
- a null field means "the default" (as OpenAI treats it);
- a field this server does not know is ignored, named in the log and in the
  response header X-APD-Ignored-Fields (parse_body returns them);
- a known field is refused only where ignoring it would silently change the
  output: presence_penalty / frequency_penalty other than 0, logit_bias,
  echo, best_of > 1, suffix, a non-text response_format, tools.
Range checks of the APD knobs are the Engine's own (APDConfig), so the server
and `generate` refuse exactly the same values.
"""
from __future__ import annotations

import json
import secrets
from typing import Any, Dict, List, Optional, Tuple

NUM = (int, float)
COMMON = {
    "model": str, "max_tokens": int, "max_completion_tokens": int, "temperature": NUM, "top_p": NUM,
    "top_k": int, "stop": (str, list), "seed": int, "stream": bool, "stream_options": dict, "n": int,
    "user": str, "presence_penalty": NUM, "frequency_penalty": NUM, "logit_bias": dict,
    "response_format": dict, "tools": list, "tool_choice": (str, dict), "parallel_tool_calls": bool,
    "metadata": dict, "store": bool, "service_tier": str,
    # APD's own fields.
    "R": NUM, "W": (int, type(None)), "M": int, "method": str, "acceptance": str,
}
COMPLETIONS = dict(COMMON, prompt=(str, list), logprobs=int, echo=bool, best_of=int, suffix=str)
CHAT = dict(COMMON, messages=list, logprobs=bool, top_logprobs=int)
ROLES = ("system", "user", "assistant", "developer")
MAX_N = 16  # choices per request (each is one Engine request)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit (chat top_logprobs; completions logprobs allows 5)


class BadRequest(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param}}


def parse_body(raw: bytes, schema: Dict[str, Any]) -> Tuple[dict, List[str]]:
    """raw HTTP body -> (dict of the known, non-null fields of the right JSON
    types, sorted names of the unknown fields that were ignored)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest("body", f"expected UTF-8 JSON, got an undecodable byte at offset {e.start}") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest("body", f"expected a JSON object, got invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(body, dict):
        raise BadRequest("body", f"expected a JSON object, got {type(body).__name__}")
    ignored = sorted(k for k in body if k not in schema)
    # null is the default, except APD's W, where null is a value (no dLLM KV cache).
    body = {k: v for k, v in body.items() if k in schema and (v is not None or k == "W")}
    for key, value in body.items():
        wants = schema[key] if isinstance(schema[key], tuple) else (schema[key],)
        if (isinstance(value, bool) and bool not in wants) or not isinstance(value, wants):
            raise BadRequest(key, f"wrong JSON type {type(value).__name__}")
    _refuse_output_changers(body)
    n = body.get("n", 1)
    if not 1 <= n <= MAX_N:
        raise BadRequest("n", f"expected 1 to {MAX_N} choices, got {n}")
    if body.get("method", "apd") != "apd":
        raise BadRequest("method", f"expected 'apd' (this server runs APD), got {body['method']!r}")
    so = body.get("stream_options")
    if so is not None:
        if set(so) - {"include_usage", "continuous_usage_stats"} or not isinstance(so.get("include_usage", False), bool):
            raise BadRequest("stream_options", "expected {\"include_usage\": bool}")
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body and body[key] < 1:
            raise BadRequest(key, f"expected an int >= 1, got {body[key]}")
    if "max_tokens" in body and "max_completion_tokens" in body and body["max_tokens"] != body["max_completion_tokens"]:
        raise BadRequest("max_completion_tokens", f"differs from max_tokens ({body['max_completion_tokens']} "
                         f"vs {body['max_tokens']}); give one of them")
    return body, ignored


def _refuse_output_changers(body: dict) -> None:
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key, 0) != 0:
            raise BadRequest(key, f"expected 0 (APD applies no penalties), got {body[key]}")
    if body.get("logit_bias"):
        raise BadRequest("logit_bias", "expected {} (APD applies no logit bias)")
    if body.get("echo", False):
        raise BadRequest("echo", "expected false (the prompt is not returned)")
    if body.get("best_of", 1) != 1:
        raise BadRequest("best_of", f"expected 1, got {body['best_of']}")
    if body.get("suffix"):
        raise BadRequest("suffix", "expected none (APD does not insert)")
    if body.get("response_format", {"type": "text"}).get("type") != "text":
        raise BadRequest("response_format", "expected {\"type\": \"text\"} (no constrained decoding)")
    if body.get("tools"):
        raise BadRequest("tools", "expected none (no tool calling)")
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if isinstance(lp, int) and not isinstance(lp, bool) and not 0 <= lp <= 5:
        raise BadRequest("logprobs", f"expected 0 to 5 (top alternatives per token), got {lp}")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadRequest("top_logprobs", f"expected 0 to {MAX_TOP_LOGPROBS}, got {top}")
    if top and not lp:
        raise BadRequest("top_logprobs", "needs logprobs: true")


def logprobs_k(body: dict) -> Optional[int]:
    """None: no logprobs; else how many top alternatives per token."""
    lp = body.get("logprobs")
    if lp is None or lp is False:
        return None
    if lp is True:
        return int(body.get("top_logprobs", 0))
    return int(lp)


def prompt_text(body: dict) -> str:
    p = body.get("prompt")
    if p is None:
        raise BadRequest("prompt", "required")
    if isinstance(p, list):
        if len(p) != 1 or not isinstance(p[0], str):
            raise BadRequest("prompt", "expected a string (or a list of exactly one string)")
        p = p[0]
    if not p:
        raise BadRequest("prompt", "expected a non-empty string")
    return p


def chat_messages(body: dict) -> List[dict]:
    msgs = body.get("messages")
    if not msgs:
        raise BadRequest("messages", "expected a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(msgs):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content", "expected a string or text parts")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(content, str):
            raise BadRequest(f"messages[{i}]", f"expected {{role: one of {list(ROLES)}, content: string}}")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if not any(m["content"] for m in out):
        raise BadRequest("messages", "expected at least one non-empty content")
    return out


def stop_strings(body: dict) -> List[str]:
    """OpenAI's stop: a string or a list of strings, each of any token length
    (matched on the text by the Engine's output path)."""
    stop = body.get("stop")
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in items):
        raise BadRequest("stop", "expected a non-empty string or a list of non-empty strings")
    return list(items)


# Request field -> (Engine param, APDConfig field named in its errors).
ENGINE_FIELDS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
                 "top_k": "top_k", "seed": "seed", "R": "R", "W": "W", "M": "M", "acceptance": "acceptance"}
_BACK = {v: k for k, v in ENGINE_FIELDS.items()}


def engine_params(body: dict) -> dict:
    out = {ENGINE_FIELDS[k]: body[k] for k in ENGINE_FIELDS if k in body}
    if "max_completion_tokens" in body:
        out["max_new_tokens"] = body["max_completion_tokens"]
    return out


def budget_field(body: dict) -> str:
    return "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"


def draw_seed() -> int:
    """A fresh seed for a request that gave none (returned so it can be
    replayed); 53 bits, exact in every JSON client."""
    return secrets.randbits(53)


def engine_error(e: Exception, body: Optional[dict] = None) -> BadRequest:
    """An Engine/APDConfig ValueError ("field: expected ...") as a BadRequest on the request's field."""
    msg = str(e)
    field = msg.split(":", 1)[0].strip()
    param = {"prompt_ids": "prompt"}.get(field, _BACK.get(field, field))
    if param == "max_tokens" and body is not None:
        param = budget_field(body)
    rest = msg.split(":", 1)[1].strip() if ":" in msg else msg
    return BadRequest(param, rest)


def usage(prompt_tokens: int, accepted: List[int], n: int = 1) -> dict:
    """accepted: the tokens accepted per step over all n choices."""
    gen = sum(accepted)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": gen, "total_tokens": prompt_tokens + gen,
            "steps": len(accepted), "tokens_per_step": round(gen / len(accepted), 4) if accepted else 0.0,
            "accepted_per_step": accepted if n == 1 else None}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()
