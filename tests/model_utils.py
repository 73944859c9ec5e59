"""Tiny random Qwen2 / Dream checkpoints for the model and loop tests.

    from tests.model_utils import make_tiny_qwen2, make_tiny_dream, hf_logits

Each builder writes a Hugging Face checkpoint folder at `path` and returns the
transformers Qwen2ForCausalLM holding the same weights (fp32, eager attention,
eval mode), which is the reference the tests compare against.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

TINY_INTERMEDIATE = 96
TINY_ROPE_THETA = 1000.0  # not the default 10000: a loader that ignored it would fail


def _build(vocab, hidden, layers, heads, kv_heads, seed, tie, intermediate, context=512, **ids):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tie,
        max_position_embeddings=context,
        rope_theta=TINY_ROPE_THETA,
        rms_norm_eps=1e-6,
        attn_implementation="eager",
        **ids,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    # Random init leaves biases at 0 and norm weights at 1: randomise them so
    # that a wrong bias or norm wiring cannot pass unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return model


def make_tiny_qwen2(
    path,
    vocab: int = 509,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    tie: bool = False,
    intermediate: int = TINY_INTERMEDIATE,
    eos_token_id=2,
    bos_token_id: Optional[int] = 1,
    pad_token_id: Optional[int] = 0,
    max_shard_size=None,
    context: int = 512,
):
    """A causal Qwen2 checkpoint (model_type "qwen2") at `path`; returns the HF model.
    context: max_position_embeddings."""
    model = _build(
        vocab, hidden, layers, heads, kv_heads, seed, tie, intermediate, context,
        eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=pad_token_id,
    )
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(os.fspath(path), **kwargs)
    return model


def make_tiny_dream(
    path,
    vocab: int = 509,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    tie: bool = False,
    intermediate: int = TINY_INTERMEDIATE,
    mask_token_id: Optional[int] = 508,
    eos_token_id=2,
    bos_token_id: Optional[int] = 1,
    pad_token_id: Optional[int] = 0,
    max_shard_size=None,
    context: int = 512,
):
    """Qwen2 weights under a Dream-v0-style config.json (model_type "Dream",
    architectures ["DreamModel"], mask_token_id) at `path`; returns the HF Qwen2
    model with the same weights (run it with bidirectional_mask() to get Dream's
    logits)."""
    model = make_tiny_qwen2(
        path, vocab, hidden, layers, heads, kv_heads, seed, tie, intermediate,
        eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=pad_token_id,
        max_shard_size=max_shard_size, context=context,
    )
    cfg_path = os.path.join(os.fspath(path), "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters", None) or {}
    cfg.pop("layer_types", None)
    cfg.update(
        {
            "architectures": ["DreamModel"],
            "model_type": "Dream",
            "rope_theta": rope.get("rope_theta", TINY_ROPE_THETA),
            "rope_scaling": None,
            "use_cache": False,
        }
    )
    if mask_token_id is None:
        cfg.pop("mask_token_id", None)
    else:
        cfg["mask_token_id"] = mask_token_id
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return model


def bidirectional_mask(batch: int, q_len: int, kv_len: int, dtype=torch.float32):
    """The additive 4D mask [B, 1, q_len, kv_len] of all zeros: every row sees every key.

    transformers 5.x skips its own causal-mask construction when attention_mask
    is a dict keyed by layer type, so passing {"full_attention": this} to
    Qwen2ForCausalLM.forward (eager attention) runs it bidirectionally."""
    return {"full_attention": torch.zeros(batch, 1, q_len, kv_len, dtype=dtype)}


@torch.no_grad()
def hf_logits(model, input_ids: torch.Tensor, *, bidirectional: bool = False) -> torch.Tensor:
    """Full-sequence logits [B, L, V] of a transformers Qwen2 model, causal or bidirectional."""
    B, L = input_ids.shape
    mask = bidirectional_mask(B, L, L, dtype=next(model.parameters()).dtype) if bidirectional else None
    return model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def make_tiny_qwen3(
    path,
    vocab: int = 509,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 24,
    seed: int = 0,
    tie: bool = False,
    intermediate: int = TINY_INTERMEDIATE,
    eos_token_id=2,
    bos_token_id: Optional[int] = 1,
    pad_token_id: Optional[int] = 0,
):
    """A causal Qwen3 checkpoint (model_type "qwen3": q_norm / k_norm, no q/k/v
    bias, explicit head_dim, here 24 != hidden / heads = 16 by default) written by
    transformers' own Qwen3ForCausalLM at `path`; returns that HF model."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tie,
        max_position_embeddings=512,
        rope_theta=TINY_ROPE_THETA,
        rms_norm_eps=1e-6,
        attn_implementation="eager",
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a q/k norm wiring error shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(os.fspath(path))
    return model
