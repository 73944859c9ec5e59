"""load_model: a local Hugging Face checkpoint folder (config.json, safetensors
single file or sharded index, optional generation_config.json) or a live
transformers Qwen2ForCausalLM -> a Qwen2Runtime. No network, no remote code."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from apd_ext.models.config import ModelConfig, parse_config, read_folder_config, read_json
from apd_ext.models.qwen2 import Qwen2Runtime

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def expected_shapes(c: ModelConfig) -> dict:
    """Every tensor the runtime reads, with its shape (the Qwen2 / Dream names)."""
    H, D = c.hidden_size, c.head_dim
    q, kv = c.num_heads * D, c.num_kv_heads * D
    shapes = {"model.embed_tokens.weight": (c.vocab_size, H), "model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, H)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, H),
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, H),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, H),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (H, q),
                p + "mlp.gate_proj.weight": (c.intermediate_size, H),
                p + "mlp.up_proj.weight": (c.intermediate_size, H),
                p + "mlp.down_proj.weight": (H, c.intermediate_size),
                p + "input_layernorm.weight": (H,),
                p + "post_attention_layernorm.weight": (H,),
            }
        )
    return shapes


LOCAL_ONLY = (
    "only local checkpoint folders load (no Hub downloads): fetch one first, e.g. "
    "`hf download Dream-org/Dream-v0-Instruct-7B --local-dir ./Dream-v0-Instruct-7B`, "
    "then pass that folder"
)


def _open_safetensors(path: str):
    """safe_open with a one-line error naming the file when it is truncated or corrupt."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def _get_tensor(sf, name: str, path: str):
    from safetensors import SafetensorError

    try:
        return sf.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: tensor '{name}' cannot be read (truncated or corrupt file?): {e}") from None


def _check_shape(name: str, got, shape: tuple, where: str) -> None:
    if tuple(got) != tuple(shape):
        raise ValueError(f"{where}: tensor '{name}' has shape {list(got)}, expected {list(shape)}")


def _read_folder_tensors(folder: str, shapes: dict, dtype, device) -> dict:
    index_path = os.path.join(folder, INDEX_FILE)
    single_path = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(index_path):
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: missing or malformed 'weight_map'")
        where_of = {name: weight_map.get(name) for name in shapes}
        for shard in sorted({f for f in where_of.values() if f is not None}):
            if not os.path.isfile(os.path.join(folder, shard)):
                raise FileNotFoundError(f"{os.path.join(folder, shard)}: shard listed in {INDEX_FILE} is missing")
        src_desc = index_path
    elif os.path.isfile(single_path):
        where_of = {name: SINGLE_FILE for name in shapes}
        src_desc = single_path
    else:
        raise FileNotFoundError(f"{folder}: no {SINGLE_FILE} and no {INDEX_FILE}")

    by_file: dict = {}
    for name, f in where_of.items():
        if f is None:
            raise ValueError(f"{src_desc}: tensor '{name}' is not in the checkpoint")
        by_file.setdefault(f, []).append(name)
    out = {}
    for f, names in by_file.items():
        path = os.path.join(folder, f)
        with _open_safetensors(path) as sf:
            present = set(sf.keys())
            for name in names:
                if name not in present:
                    raise ValueError(f"{path}: tensor '{name}' is missing")
                # Shape first (from the header), so a wrong tensor is never read.
                _check_shape(name, sf.get_slice(name).get_shape(), shapes[name], path)
                out[name] = _get_tensor(sf, name, path).to(device=device, dtype=dtype)
    return out


def _live_tensors(hf_model, shapes: dict, dtype, device, where: str) -> dict:
    state = hf_model.state_dict()  # detached tensors sharing the model's storage
    out = {}
    for name, shape in shapes.items():
        if name not in state:
            raise ValueError(f"{where}: tensor '{name}' is missing")
        _check_shape(name, state[name].shape, shape, where)
        out[name] = state[name].to(device=device, dtype=dtype)  # no copy when both already match
    return out


def load_model(
    src,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    *,
    kind: Optional[str] = None,
    mask_token_id: Optional[int] = None,
) -> Qwen2Runtime:
    """Load a Qwen2 (kind "ar") or Dream (kind "dllm") model.

    src: a checkpoint folder (str / PathLike) or a live transformers Qwen2ForCausalLM.
    dtype: torch.float32 / bfloat16 / float16; default float32 for a folder and the
        model's own dtype for a live model.
    device: default "cpu" for a folder and the model's own device for a live model;
        "auto": "cuda" when a CUDA device is available, else "cpu".
    kind / mask_token_id: only for a live model ("ar" by default; "dllm" runs the
        same weights bidirectionally and needs mask_token_id).
    A live model's tensors are reused without copying when dtype and device
    match; the fused QKV projection is the one copy (made once here).
    """
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    if device == "auto":  # the README's snippets: CUDA when present, else the CPU
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(src, (str, os.PathLike)):
        folder = os.fspath(src)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"src: checkpoint folder {folder!r} not found; {LOCAL_ONLY}")
        if kind is not None or mask_token_id is not None:
            raise ValueError("kind / mask_token_id: only for a live model; a folder's config.json decides")
        cfg, gen = read_folder_config(folder)
        kind_, config = parse_config(cfg, gen, where=os.path.join(folder, "config.json"))
        dtype = dtype or torch.float32
        device = torch.device(device or "cpu")
        tensors = _read_folder_tensors(folder, expected_shapes(config), dtype, device)
        return Qwen2Runtime(kind_, config, tensors, path=folder)

    hf_config = getattr(src, "config", None)
    if not isinstance(src, torch.nn.Module) or hf_config is None or not hasattr(hf_config, "to_dict"):
        raise TypeError(
            f"src: expected a checkpoint folder path or a transformers Qwen2ForCausalLM, got {type(src).__name__}"
        )
    where = f"live {type(src).__name__}"
    gen_cfg = getattr(src, "generation_config", None)
    gen = gen_cfg.to_dict() if gen_cfg is not None else {}
    kind_, config = parse_config(hf_config.to_dict(), gen, where=where, kind=kind, mask_token_id=mask_token_id)
    first = next(src.parameters())
    dtype = dtype or first.dtype
    device = torch.device(device) if device is not None else first.device
    tensors = _live_tensors(src, expected_shapes(config), dtype, device, where)
    return Qwen2Runtime(kind_, config, tensors, path=None, fuse_mlp=False)  # share, do not copy


def random_model(
    config: dict,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    std: float = 0.02,
    init_device: Union[str, torch.device, None] = None,
) -> Qwen2Runtime:
    """A model with random weights for a config.json-style dict (benchmarks and
    device smoke tests; no transformers needed). Norm weights are 1 + noise.
    The numbers are drawn on init_device (default: device; the same seed gives
    the same weights on the same init_device)."""
    kind, c = parse_config(config, where="random_model config")
    device = torch.device(device)
    init_device = torch.device(init_device) if init_device is not None else device
    g = torch.Generator(device=init_device).manual_seed(seed)
    tensors = {}
    for name, shape in expected_shapes(c).items():
        t = torch.randn(shape, generator=g, device=init_device, dtype=torch.float32) * std
        if "norm" in name:
            t += 1.0
        tensors[name] = t.to(device=device, dtype=dtype)
    return Qwen2Runtime(kind, c, tensors, path=None)

