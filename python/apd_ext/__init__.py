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
from apd_ext import engine  # noqa: F401,E402  (continuous-batching Engine: apd_ext.engine.Engine)
from apd_ext.pairs import check_pair  # noqa: F401,E402  (the pair checker: `apd check-pair`)
from apd_ext import tiny  # noqa: F401,E402  (the embedded tiny pair: apd_ext.tiny.paths(), .tokenizer())
from apd_ext.tokenization import load_tokenizer  # noqa: F401,E402  (a local folder's tokenizer)


def build_info() -> dict:
    """Which dispatch keys each apd op has kernels for in this build."""
    import torch

    names = ("sample_draft", "mixture_accept", "accept_prefix", "window_attention")
    return {
        "version": __version__,
        "cpu": all(torch._C._dispatch_has_kernel_for_dispatch_key(f"apd::{n}", "CPU") for n in names),
        "cuda": all(torch._C._dispatch_has_kernel_for_dispatch_key(f"apd::{n}", "CUDA") for n in names),
    }
