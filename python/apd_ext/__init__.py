"""apd-ext: Adaptive Parallel Decoding kernels and runtime for diffusion LLMs.

Ops live in :mod:`apd_ext.ops` (also reachable as ``torch.ops.apd.*``); the
pure-PyTorch oracle of every op is :mod:`apd_ext.reference`.
"""

__version__ = "0.1.0"

from apd_ext import ops  # noqa: F401  (loads the extension, registers fakes)
from apd_ext.models import check_compatible, load_model  # noqa: F401,E402  (Qwen2 / Dream runtime)
from apd_ext.generate import (  # noqa: F401,E402  (APD loop and baselines)
    APDConfig,
    APDOutput,
    generate,
    generate_ar,
    generate_diffusion,
    generate_leftright,
)
