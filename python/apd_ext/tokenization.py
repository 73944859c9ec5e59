"""The tokenizer of a local checkpoint folder.

One loader for the CLI, the lm-eval model and the server replicas. The
embedded tiny pair's folders load through :func:`apd_ext.tiny.tokenizer`
(the PreTrainedTokenizerFast their tokenizer_config.json names): transformers'
AutoTokenizer also parses config.json, and on the tiny dLLM's
`model_type: "Dream"` (no remote code shipped) it falls back to a bare config,
which logs "model of type `Dream` to instantiate a model of type ``" and a
rope_scaling FutureWarning on every load; on the tiny AR folder
(`model_type: qwen2`) it would pick Qwen2Tokenizer, whose digit-splitting
pre-tokenizer does not reproduce the pair's ids. Any other folder loads with
AutoTokenizer, as its own files say.
"""

from __future__ import annotations

import os

__all__ = ["load_tokenizer", "is_embedded_pair_folder"]


def is_embedded_pair_folder(folder) -> bool:
    """Whether ``folder`` is one of the embedded tiny pair's two folders."""
    from apd_ext.tiny import paths

    real = os.path.realpath(str(folder))
    return any(real == os.path.realpath(str(p)) for p in paths())


def load_tokenizer(folder, **kwargs):
    """The tokenizer of a local folder (never a Hub download)."""
    if is_embedded_pair_folder(folder):
        from apd_ext.tiny import tokenizer

        return tokenizer(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
