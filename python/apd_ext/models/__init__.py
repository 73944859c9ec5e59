"""A lean Qwen2 / Dream runtime over the apd kernels (DESIGN.md §6).

    model = apd_ext.load_model(folder_or_hf_model, dtype=..., device=...)
    cache = model.new_cache(batch_size, max_len)
    logits = model.forward(input_ids, cache, q_start, q_len, logit_rows=None, packing=None)
    # packing = Packing.build(q_len_host, Lw, device): only the valid rows run
"""
from apd_ext.models.cache import KVCache
from apd_ext.models.compat import check_compatible
from apd_ext.models.config import ModelConfig
from apd_ext.models.graphs import BucketedGraphs, GraphedForward
from apd_ext.models.loader import load_model, random_model
from apd_ext.models.packing import Packing
from apd_ext.models.qwen2 import Qwen2Runtime

__all__ = [
    "BucketedGraphs",
    "GraphedForward",
    "KVCache",
    "ModelConfig",
    "Packing",
    "Qwen2Runtime",
    "check_compatible",
    "load_model",
    "random_model",
]
