"""The model description the runtime needs, read from a Hugging Face config.json
(plus generation_config.json) or from a live transformers config object.

One decoder layout (RMSNorm, GQA attention with RoPE, SwiGLU MLP) in three
flavours, the differences carried as data (ModelConfig.qkv_bias / qk_norm):
- model_type "qwen2" (Qwen2 / Qwen2.5): causal, kind "ar", q/k/v bias;
- model_type "qwen3" (Qwen3 dense): causal, kind "ar", no q/k/v bias, a per-head
  RMSNorm on q and k before RoPE (q_norm / k_norm), an explicit head_dim;
- model_type "Dream" (Dream-v0 and its family: DiffuCoder, Dream-Coder,
  d3LLM-Dream; architectures ["DreamModel"]): Qwen2 weights run
  bidirectionally, kind "dllm", with a mask token id.
A Qwen3 checkpoint flagged as a dLLM (kind="dllm" on a live model) runs the
Qwen3 layout bidirectionally. Fields that would change the math but that the
runtime does not implement are refused by name, never ignored.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

# model_type (lower-cased) -> kind
MODEL_KINDS = {"qwen2": "ar", "qwen3": "ar", "dream": "dllm"}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    mask_token_id: Optional[int]  # None for an AR model
    eos_token_ids: list = field(default_factory=list)  # list[int], may be empty
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    qkv_bias: bool = True  # q/k/v projections carry a bias (Qwen2 / Dream; Qwen3 attention_bias)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)


def _ids(value) -> list:
    """An id field that may be absent, an int or a list of ints -> list[int]."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _first(*values):
    for v in values:
        if v is not None:
            return v
    return None


def _require(cfg: Mapping[str, Any], key: str, where: str):
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{where}: missing required field '{key}'")
    return cfg[key]


# Fields whose non-default value changes the forward but that this runtime does
# not implement: field -> (the value(s) it runs, what the runtime would do instead).
# Checked for every model_type (absent or null is fine).
_IGNORED = {
    "attention_bias": ((False,), "a q/k/v/o bias (Qwen3 attention_bias=true)"),
    "mlp_bias": ((False,), "an MLP bias"),
    "partial_rotary_factor": ((1, 1.0), "RoPE on part of each head"),
    "attn_logit_softcapping": ((None,), "attention logit soft-capping"),
    "final_logit_softcapping": ((None,), "final logit soft-capping"),
    "pretraining_tp": ((1,), "tensor-parallel-sliced linear layers"),
    "num_experts": ((None, 0), "mixture-of-experts layers"),
}


def _refuse_ignored(cfg: Mapping[str, Any], mt: str, where: str) -> None:
    """One clear error naming a field the runtime would otherwise silently ignore."""
    for key, (ok, what) in _IGNORED.items():
        if key == "attention_bias" and mt != "qwen3":
            continue  # Qwen2 / Dream always have q/k/v bias; their configs carry no meaningful flag
        if key in cfg and cfg[key] is not None and cfg[key] not in ok:
            raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported ({what} is not implemented)")
    types = cfg.get("layer_types")
    if types is not None:
        other = sorted({str(t) for t in types} - {"full_attention"})
        if other:
            raise ValueError(f"{where}: layer_types {other} are not supported (only full_attention layers)")


def parse_config(
    cfg: Mapping[str, Any],
    gen: Optional[Mapping[str, Any]] = None,
    *,
    where: str = "config.json",
    kind: Optional[str] = None,
    mask_token_id: Optional[int] = None,
) -> tuple[str, ModelConfig]:
    """(kind, ModelConfig) from a config.json dict and an optional generation_config.json dict.

    kind / mask_token_id override what the config says (used for live models
    that the caller flags as a dLLM)."""
    gen = dict(gen or {})
    model_type = _require(cfg, "model_type", where)
    mt = str(model_type).lower()
    if mt not in MODEL_KINDS:
        raise ValueError(
            f"{where}: unsupported model_type '{model_type}' (expected 'qwen2' or 'qwen3' for an AR "
            f"model or 'Dream' for a diffusion LLM)"
        )
    if kind is None:
        kind = MODEL_KINDS[mt]
    elif kind not in ("ar", "dllm"):
        raise ValueError(f"kind: expected 'ar' or 'dllm', got {kind!r}")

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act must be 'silu' (SwiGLU), got {act!r}")
    if cfg.get("use_sliding_window", False):
        raise ValueError(f"{where}: use_sliding_window=true is not supported")
    _refuse_ignored(cfg, mt, where)
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in (None, "default"):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (only plain RoPE)")
    rope_theta = _first(cfg.get("rope_theta"), rope.get("rope_theta"))
    if rope_theta is None:
        raise ValueError(f"{where}: missing required field 'rope_theta' (or rope_parameters.rope_theta)")

    hidden = int(_require(cfg, "hidden_size", where))
    heads = int(_require(cfg, "num_attention_heads", where))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads != 0:
        raise ValueError(
            f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    if head_dim % 2 != 0:
        raise ValueError(f"{where}: head_dim must be even for RoPE, got {head_dim}")

    # generation_config.json wins over config.json for the special ids (it is
    # what generate() uses); the EOS set is the union of both, config first.
    eos = []
    for i in _ids(cfg.get("eos_token_id")) + _ids(gen.get("eos_token_id")):
        if i not in eos:
            eos.append(i)
    mask = _first(mask_token_id, gen.get("mask_token_id"), cfg.get("mask_token_id"))
    if kind == "dllm" and mask is None:
        raise ValueError(
            f"{where}: a diffusion LLM needs 'mask_token_id' (in config.json or generation_config.json)"
        )
    if kind == "ar":
        mask = None

    qwen3 = mt == "qwen3"
    config = ModelConfig(
        model_type=str(model_type),
        vocab_size=int(_require(cfg, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size", where)),
        num_layers=int(_require(cfg, "num_hidden_layers", where)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=float(rope_theta),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 32768),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        mask_token_id=None if mask is None else int(mask),
        eos_token_ids=eos,
        pad_token_id=_first(gen.get("pad_token_id"), cfg.get("pad_token_id")),
        bos_token_id=_first(gen.get("bos_token_id"), cfg.get("bos_token_id")),
        qkv_bias=not qwen3,  # attention_bias=true is refused above for qwen3
        qk_norm=qwen3,
    )
    return kind, config


def read_json(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def check_folder(name: str, folder: str, hint: str = "") -> None:
    """A checkpoint folder, checked before anything reads it (so a wrong path
    is named first, not as a tokenizer or safetensors error): a file says it is
    a file, a folder without config.json says so. hint ends the not-found line."""
    if os.path.isfile(folder):
        raise NotADirectoryError(f"{name}: {folder!r} is a file, expected a checkpoint folder "
                                 "(the folder holding config.json and the *.safetensors)")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{name}: checkpoint folder {folder!r} not found" + (f"; {hint}" if hint else ""))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{name}: no config.json in {folder} (every checkpoint folder needs one)")


def read_folder_config(folder: str, name: str = "src") -> tuple[dict, dict]:
    """config.json (required) and generation_config.json (optional) of a checkpoint folder."""
    check_folder(name, folder)
    gen_path = os.path.join(folder, "generation_config.json")
    gen = read_json(gen_path) if os.path.isfile(gen_path) else {}
    return read_json(os.path.join(folder, "config.json")), gen
