"""apd-ext: Adaptive Parallel Decoding kernels and runtime for diffusion LLMs.

Ops live in :mod:`apd_ext.ops` (also reachable as ``torch.ops.apd.*``); the
pure-PyTorch oracle of every op is :mod:`apd_ext.reference`.
"""

__version__ = "0.1.0"

from apd_ext import ops  # noqa: F401  (loads the extension, registers fakes)
from apd_ext.models import check_compatible, load_model  # noqa: F401,E402  (Qwen2 / Dream runtime)
from apd_ext.config import APDConfig  # noqa: F401,E402
from apd_ext.decoding import (  # noqa: F401,E402  (APD loop, its baselines, the continuous-batching Engine)
    DIFFUSION_ALGS,
    APDOutput,
    Engine,
    GenerationStats,
    StepOutput,
    generate,
    generate_ar,
    generate_diffusion,
    generate_leftright,
)
from apd_ext.pairs import check_pair  # noqa: F401,E402  (the pair checker: `apd check-pair`)
from apd_ext import tiny  # noqa: F401,E402  (the embedded tiny pair: apd_ext.tiny.paths(), .tokenizer())
from apd_ext.tokenization import load_tokenizer  # noqa: F401,E402  (a local folder's tokenizer)


def build_info() -> dict:
    """What this build holds: which dispatch keys each apd op has kernels for
    ("cpu", "cuda": registered in the running process), and the record compiled
    into the extension (apd_ext/_build_info.py): "cuda_kernels", "cuda_archs"
    ({"sass": ["80", ...], "ptx": ["120"]}), "cuda_version" (nvcc's), "torch"
    and "cxx11_abi" (the torch it was built against), "arch_source" (which rule
    chose the archs) and "source_dir"; None for each when the .so has no record."""
    import torch

    from apd_ext import _build_info

    names = ("sample_draft", "mixture_accept", "accept_prefix", "window_attention")
    info = {
        "version": __version__,
        "cpu": all(torch._C._dispatch_has_kernel_for_dispatch_key(f"apd::{n}", "CPU") for n in names),
        "cuda": all(torch._C._dispatch_has_kernel_for_dispatch_key(f"apd::{n}", "CUDA") for n in names),
    }
    record = _build_info.record() or {}
    for key in ("cuda_kernels", "cuda_archs", "cuda_version", "torch", "cxx11_abi", "arch_source", "source_dir"):
        info[key] = record.get(key)
    return info
