"""Pure-PyTorch reference of every apd op, written from DESIGN.md to the
letter and computed in fp32/fp64. It is the oracle of the tests and is never
used on a hot path.
"""
from __future__ import annotations

import torch

# ---------------------------------------------------------------------------
# Philox4x32-10 and Gumbel noise (DESIGN.md §3)
# ---------------------------------------------------------------------------

# (section owned by the sampling work)

# ---------------------------------------------------------------------------
# Sampling core (DESIGN.md §4)
# ---------------------------------------------------------------------------

# (section owned by the sampling work)

# ---------------------------------------------------------------------------
# Masked-window attention (DESIGN.md §5)
# ---------------------------------------------------------------------------

# (section owned by the attention work)
