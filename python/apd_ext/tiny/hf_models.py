"""The tiny pair as plain transformers modules (no apd kernels), shared by
training (tiny/train.py) and its evaluation (tiny/evaluate.py): the
architecture, the special ids, the bidirectional mask and Dream's shifted
logits of the dLLM, a fresh model and an exported folder loaded back."""
from __future__ import annotations

import json
from pathlib import Path

import torch

EOS_ID, PAD_ID, MASK_ID = 0, 1, 2  # train.SPECIALS: eos(=bos), pad, mask

# Architecture of both models (the dLLM is the AR model run bidirectionally).
ARCH = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1,
            intermediate_size=576, max_position_embeddings=512, rope_theta=10000.0,
            rms_norm_eps=1e-6, hidden_act="silu", attention_dropout=0.0)


def bidir_mask(keymask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[B, L] key validity -> additive [B, 1, L, L] mask: every row sees every valid key."""
    m = torch.zeros(keymask.shape[0], 1, 1, keymask.shape[1], dtype=dtype)
    m = m.masked_fill(~keymask[:, None, None, :], torch.finfo(dtype).min)
    return m.expand(-1, 1, keymask.shape[1], -1)


def dllm_logits(model, ids, keymask):
    """Dream's shifted logits: row i predicts token i, from the hidden state at i - 1."""
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    out = model(input_ids=ids, attention_mask=bidir_mask(keymask), position_ids=pos).logits
    return torch.cat([out[:, :1], out[:, :-1]], dim=1)


def new_model(vocab_size: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=True, bos_token_id=EOS_ID,
                      eos_token_id=EOS_ID, pad_token_id=PAD_ID, use_cache=True, **ARCH)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg)


def load_exported(d: Path, dtype=torch.float32):
    """The exported folder as a transformers Qwen2ForCausalLM (either kind)."""
    from safetensors.torch import load_file
    cfg = json.loads((d / "config.json").read_text())
    model = new_model(cfg["vocab_size"], 0)
    sd = load_file(str(d / "model.safetensors"))
    sd.pop("lm_head.weight", None)
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    return model.to(dtype).eval()
