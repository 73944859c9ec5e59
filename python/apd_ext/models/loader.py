"""load_model: a local Hugging Face checkpoint folder (config.json, safetensors
single file or sharded index, optional generation_config.json) or a live
transformers Qwen2ForCausalLM -> a Qwen2Runtime. No network, no remote code.

A folder loads at the size it ends at. Every runtime buffer is allocated once,
on the target device and in the target dtype (the fused q/k/v and gate/up ones
whole, their parts row views). Shard by shard, each checkpoint tensor is read
with plain read() into its slice (same dtype, CPU) or through one reused
32 MiB staging buffer (converting, or onto CUDA), and the shard is closed
before the next. Not safetensors' safe_open: its get_tensor maps the file, and
every page a copy touches stays in the RSS until the file closes (safetensors
0.8, measured: copying a 0.43 GiB shard into place peaked at +0.87 GiB; a
Dream-7B shard is 4 GiB, +28% of the model). Memory traffic: the checkpoint
read once, the resident bytes written once. Measured (bench/NOTES.md,
"Loading"): a 1.5B-shaped bf16 folder loaded as float32 peaks at 1.081x
resident (main's loader: 1.558x); a Dream-7B-shaped one loaded as bf16, 1.036x."""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, Union

import torch

from apd_ext._validate import check_device
from apd_ext.models.config import ModelConfig, check_folder, parse_config, read_folder_config, read_json
from apd_ext.models.qwen2 import Qwen2Runtime

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def expected_shapes(c: ModelConfig) -> dict:
    """Every tensor the runtime reads, with its shape (the Qwen2 / Qwen3 / Dream names)."""
    H, D = c.hidden_size, c.head_dim
    q, kv = c.num_heads * D, c.num_kv_heads * D
    shapes = {"model.embed_tokens.weight": (c.vocab_size, H), "model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, H)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        if c.qkv_bias:  # Qwen2 / Dream
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if c.qk_norm:  # Qwen3: one RMSNorm weight per head_dim, shared by the heads
            shapes.update({p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)})
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, H),
                p + "self_attn.k_proj.weight": (kv, H),
                p + "self_attn.v_proj.weight": (kv, H),
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

# Runtime tensors stacked (along dim 0, in this order) from several checkpoint
# tensors, per layer. Everything else in expected_shapes loads one to one, so an
# architecture with more tensors (q_norm / k_norm, ...) only adds names there;
# one that fuses more adds a row here.
FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attn.qkv_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}

# safetensors dtype codes the loader reads (little-endian, as the format says).
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A converting read (dtype or device differs from the file) goes through one
# reused staging buffer of this size: the only memory a load holds beyond what
# stays resident.
STAGE_BYTES = 32 << 20


def checkpoint_dtype(cfg: dict) -> torch.dtype:
    """The dtype a folder loads in by default: config.json's `torch_dtype`
    (transformers 5 writes `dtype`) when it is float32 / bfloat16 / float16,
    else float32."""
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if isinstance(name, str):
        return _DTYPE_NAMES.get(name.replace("torch.", ""), torch.float32)
    return torch.float32


def _allocate(shapes: dict, dtype, device) -> tuple:
    """(runtime tensors by name, destination of each checkpoint tensor): every
    buffer allocated once, on the device and in the dtype, fused ones whole with
    their parts as row views (contiguous), so a checkpoint tensor is copied
    straight into its place and never concatenated afterwards."""
    tensors, dest = {}, {}
    done = set()
    for name, shape in shapes.items():
        if name in done:
            continue
        prefix, fused = None, None
        for fused_name, parts in FUSED.items():
            for part in parts:
                if name.endswith("." + part):
                    prefix, fused = name[: -len(part)], fused_name
        part_names = [prefix + p for p in FUSED[fused]] if fused else []
        if fused and all(n in shapes for n in part_names):
            rows = [shapes[n][0] for n in part_names]
            buf = torch.empty((sum(rows), *shape[1:]), dtype=dtype, device=device)
            tensors[prefix + fused] = buf
            for n, view in zip(part_names, buf.split(rows)):
                tensors[n] = dest[n] = view
                done.add(n)
        else:
            tensors[name] = dest[name] = torch.empty(shape, dtype=dtype, device=device)
    return tensors, dest


def _check_shape(name: str, got, shape: tuple, where: str) -> None:
    if tuple(got) != tuple(shape):
        raise ValueError(f"{where}: tensor '{name}' has shape {list(got)}, expected {list(shape)}")


def _corrupt(path: str, why: str) -> ValueError:
    return ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {why}")


def _read_header(f, path: str) -> tuple:
    """(tensor entries by name, byte where the data starts) of an open safetensors
    file: an 8-byte little-endian header length, then that much JSON."""
    head = f.read(8)
    if len(head) < 8:
        raise _corrupt(path, "shorter than its 8-byte header length")
    n = int.from_bytes(head, "little")
    size = os.fstat(f.fileno()).st_size
    if n > size - 8 or n > 100 << 20:
        raise _corrupt(path, f"header length {n} does not fit the file's {size} bytes")
    try:
        entries = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not JSON ({e})") from None
    if not isinstance(entries, dict):
        raise _corrupt(path, "header is not a JSON object")
    entries.pop("__metadata__", None)
    return entries, 8 + n


def _readinto(f, buf: torch.Tensor, path: str, name: str) -> None:
    """Fill a contiguous CPU tensor with the file's next bytes."""
    view = memoryview(buf.view(torch.uint8).numpy()).cast("B")  # the tensor's own bytes
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"{path}: tensor '{name}' cannot be read (truncated or corrupt file?): "
                             f"the file ends {len(view) - got} bytes early")
        got += n


def _read_tensor(f, path: str, name: str, info, data_start: int, dst: torch.Tensor, stage: list) -> None:
    """Copy one checkpoint tensor into dst (its final place). A same-dtype CPU
    load reads the file straight into dst; any other goes through the staging
    buffer in slices (converted and moved by copy_), so no whole-tensor
    temporary exists either way."""
    src_dtype = _ST_DTYPES.get(info.get("dtype"))
    if src_dtype is None:
        raise ValueError(f"{path}: tensor '{name}' has dtype {info.get('dtype')!r}; expected F32, BF16, F16 or F64")
    try:
        begin, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise _corrupt(path, f"tensor '{name}' has no valid data_offsets") from None
    if end - begin != dst.numel() * src_dtype.itemsize:
        raise _corrupt(path, f"tensor '{name}' spans {end - begin} bytes, its shape needs "
                       f"{dst.numel() * src_dtype.itemsize}")
    f.seek(data_start + begin)
    flat = dst.view(-1)  # [N] (dst is contiguous: a whole buffer or a row block of one)
    if dst.device.type == "cpu" and dst.dtype == src_dtype:
        _readinto(f, flat, path, name)
        return
    per = max(1, STAGE_BYTES // src_dtype.itemsize)
    if not stage or stage[0].dtype != src_dtype:
        stage[:] = [torch.empty(per, dtype=src_dtype)]
    for s in range(0, flat.numel(), per):
        chunk = stage[0][: min(per, flat.numel() - s)]
        _readinto(f, chunk, path, name)
        flat[s : s + chunk.numel()].copy_(chunk)


class _Progress:
    """One \r-updated line on stderr, per shard: only on a terminal, never with quiet."""

    def __init__(self, folder: str, total_bytes: int, quiet: bool):
        self.on = not quiet and sys.stderr.isatty()
        self.folder, self.total, self.done = folder, total_bytes, 0

    def shard(self, i: int, n: int, fname: str, nbytes: int) -> None:
        self.done += nbytes
        if self.on:
            sys.stderr.write(f"\rloading {self.folder}: shard {i}/{n} {fname} "
                             f"({self.done / 2**30:.2f} / {self.total / 2**30:.2f} GiB)\033[K")
            sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _checkpoint_files(folder: str, shapes: dict) -> dict:
    """{shard file name: [checkpoint tensor names]}, in file order."""
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
    return dict(sorted(by_file.items()))


def _read_folder_tensors(folder: str, shapes: dict, dtype, device, quiet: bool = True) -> dict:
    """The runtime's tensors, read shard by shard, one tensor at a time, each
    straight into its final buffer (no mmap: mapped pages would count in the
    RSS until the file closes). Peak = what stays resident + STAGE_BYTES."""
    by_file = _checkpoint_files(folder, shapes)
    tensors, dest = _allocate(shapes, dtype, device)
    sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in by_file}
    progress = _Progress(folder, sum(sizes.values()), quiet)
    stage: list = []  # the one staging buffer, made on first need
    try:
        for i, (fname, names) in enumerate(by_file.items(), 1):
            path = os.path.join(folder, fname)
            with open(path, "rb", buffering=0) as f:
                entries, data_start = _read_header(f, path)
                for name in names:
                    info = entries.get(name)
                    if not isinstance(info, dict):
                        raise ValueError(f"{path}: tensor '{name}' is missing")
                    # Shape first (from the header), so a wrong tensor is never read.
                    _check_shape(name, info.get("shape", ()), shapes[name], path)
                    _read_tensor(f, path, name, info, data_start, dest[name], stage)
            progress.shard(i, len(by_file), fname, sizes[fname])
    finally:
        progress.close()
    return tensors


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
    quiet: bool = False,
) -> Qwen2Runtime:
    """Load a Qwen2 (kind "ar") or Dream (kind "dllm") model.

    src: a checkpoint folder (str / PathLike) or a live transformers Qwen2ForCausalLM.
    dtype: torch.float32 / bfloat16 / float16. Default for a folder: the
        checkpoint's own dtype (config.json `torch_dtype`, or `dtype` as
        transformers 5 writes it; float32 when absent), so Dream-7B loads in
        bf16 (14.2 GiB), not float32 (28 GiB). Default for a live model: its dtype.
        An explicit dtype always wins.
    device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when torch sees a GPU, else
        the CPU). Default "cpu" for a folder and the model's own device for a
        live model. A device that is not present is a ValueError naming `device`.
    kind / mask_token_id: only for a live model ("ar" by default; "dllm" runs the
        same weights bidirectionally and needs mask_token_id).
    quiet: no per-shard progress line (it is only ever shown on a terminal).

    A folder loads at the size it ends at: every buffer (the fused q/k/v and
    gate/up ones included) is allocated once on the device, and each checkpoint
    tensor is read into its slice and released, shard by shard, so the peak is
    what stays resident plus a 32 MiB staging buffer (bench/NOTES.md, loading).
    A live model's tensors are reused without copying when dtype and device
    match; the fused QKV projection is the one copy (made once here).
    """
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    if isinstance(src, (str, os.PathLike)):
        folder = os.fspath(src)
        check_folder("src", folder, hint=LOCAL_ONLY)
        if kind is not None or mask_token_id is not None:
            raise ValueError("kind / mask_token_id: only for a live model; a folder's config.json decides")
        device = check_device("device", device if device is not None else "cpu")
        cfg, gen = read_folder_config(folder)
        kind_, config = parse_config(cfg, gen, where=os.path.join(folder, "config.json"))
        dtype = dtype or checkpoint_dtype(cfg)
        tensors = _read_folder_tensors(folder, expected_shapes(config), dtype, device, quiet=quiet)
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
    device = check_device("device", device) if device is not None else first.device
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

