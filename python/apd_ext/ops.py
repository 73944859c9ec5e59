"""Thin Python wrappers over the apd ops: argument validation with clear
errors, docstrings, and a fake (meta) kernel per op so that torch.compile and
CUDA graphs can trace them. The kernels are registered by apd_ext._C under
torch.ops.apd; semantics are those of ../shared/DESIGN.md.
"""
from __future__ import annotations

import torch

from apd_ext import _C  # noqa: F401  (registers torch.ops.apd.*)
from apd_ext._validate import (  # noqa: F401
    FLOAT_DTYPES,
    INT_DTYPES,
    check_batch_vector,
    check_choice,
    check_range,
    check_tensor,
    fail,
)

__all__ = ["sample_draft", "mixture_accept", "accept_prefix", "window_attention"]

# ---------------------------------------------------------------------------
# Sampling core (DESIGN.md §4): sample_draft, mixture_accept, accept_prefix
# ---------------------------------------------------------------------------

# (section owned by the sampling work)

# ---------------------------------------------------------------------------
# Masked-window attention (DESIGN.md §5): window_attention
# ---------------------------------------------------------------------------

# (section owned by the attention work)
