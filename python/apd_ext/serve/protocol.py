"""The OpenAI-style request bodies the server accepts, checked field by field.

Every problem raises BadRequest naming the field (the server answers 400 with
{"error": {"message", "type": "invalid_request_error", "param": field}}).
Only the fields below are accepted: an unknown field is an error, not ignored.
Range checks of the APD knobs are the Engine's own (APDConfig), so the server
and `generate` refuse exactly the same values.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

COMMON = {
    "model": str, "max_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int,
    "stop": (str, list), "seed": int, "stream": bool, "n": int, "user": str,
    # APD's own fields.
    "R": (int, float), "W": (int, type(None)), "M": int, "method": str, "acceptance": str,
}
COMPLETIONS = dict(COMMON, prompt=(str, list))
CHAT = dict(COMMON, messages=list)
ROLES = ("system", "user", "assistant")


class BadRequest(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param}}


def parse_body(raw: bytes, schema: Dict[str, Any]) -> dict:
    """raw HTTP body -> dict with only known fields of the right JSON types."""
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
    for key, value in body.items():
        if key not in schema:
            raise BadRequest(key, f"unknown field; expected some of {sorted(schema)}")
        wants = schema[key] if isinstance(schema[key], tuple) else (schema[key],)
        if (isinstance(value, bool) and bool not in wants) or not isinstance(value, wants):
            raise BadRequest(key, f"wrong JSON type {type(value).__name__}")
    if body.get("n", 1) != 1:
        raise BadRequest("n", f"expected 1 (one choice per request), got {body['n']}")
    if body.get("method", "apd") != "apd":
        raise BadRequest("method", f"expected 'apd' (this server runs APD), got {body['method']!r}")
    return body


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
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or \
                m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}]", f"expected {{role: one of {list(ROLES)}, content: string}}")
    if not any(m["content"] for m in msgs):
        raise BadRequest("messages", "expected at least one non-empty content")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def stop_ids(body: dict, tok) -> Optional[List[int]]:
    """OpenAI's stop strings, each of which must be ONE token of the vocabulary
    (APD stops on token ids, DESIGN §4). None: the checkpoint's EOS only."""
    stop = body.get("stop")
    if stop is None:
        return None
    items = [stop] if isinstance(stop, str) else stop
    if not (1 <= len(items) <= 4) or not all(isinstance(s, str) and s for s in items):
        raise BadRequest("stop", "expected a non-empty string or a list of 1 to 4 of them")
    ids = []
    for s in items:
        enc = tok(s, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise BadRequest("stop", f"expected strings that are single tokens; {s!r} is {len(enc)} tokens")
        ids.append(int(enc[0]))
    return ids


# Request field -> (Engine param, APDConfig field named in its errors).
ENGINE_FIELDS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
                 "top_k": "top_k", "seed": "seed", "R": "R", "W": "W", "M": "M", "acceptance": "acceptance"}
_BACK = {v: k for k, v in ENGINE_FIELDS.items()}


def engine_params(body: dict) -> dict:
    return {ENGINE_FIELDS[k]: body[k] for k in ENGINE_FIELDS if k in body}


def engine_error(e: Exception) -> BadRequest:
    """An Engine/APDConfig ValueError ("field: expected ...") as a BadRequest on the request's field."""
    msg = str(e)
    field = msg.split(":", 1)[0].strip()
    param = {"prompt_ids": "prompt"}.get(field, _BACK.get(field, field))
    rest = msg.split(":", 1)[1].strip() if ":" in msg else msg
    return BadRequest(param, rest)


def usage(prompt_tokens: int, accepted: List[int]) -> dict:
    gen = sum(accepted)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": gen, "total_tokens": prompt_tokens + gen,
            "steps": len(accepted), "tokens_per_step": round(gen / len(accepted), 4) if accepted else 0.0,
            "accepted_per_step": accepted}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def split_finish(tokens: List[int], stop: set) -> Tuple[List[int], bool]:
    """The ids that become text (stop ids dropped) and whether one was met."""
    body = [t for t in tokens if t not in stop]
    return body, len(body) != len(tokens)
