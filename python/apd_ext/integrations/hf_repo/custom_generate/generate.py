"""APD as a transformers custom_generate folder (`custom_generate/generate.py`).

transformers calls `generate(model=..., **generate's own arguments)` with the
raw arguments of `model.generate(...)`. We hand them back to transformers'
standard `generate` with the callable form, so that input preparation,
generation_config merging and stopping criteria are transformers' own, and
the decoding loop is apd_ext.integrations.hf.apd_generate.
"""
from transformers.generation.utils import GenerationMixin

from apd_ext.integrations.hf import apd_generate


def generate(model, **kwargs):
    kwargs.pop("custom_generate", None)
    kwargs.pop("trust_remote_code", None)
    # GenerationMixin.generate, not model.generate: the latter may be this very function
    # (transformers binds it when a model folder with custom_generate/ is loaded).
    return GenerationMixin.generate(model, custom_generate=apd_generate, **kwargs)
