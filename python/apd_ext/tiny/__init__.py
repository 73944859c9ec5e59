"""The embedded tiny model pair: a dLLM (Dream layout) and its AR verifier,
trained on :mod:`apd_ext.tasks.arith` word problems and shipped as package data.
"""

from __future__ import annotations

from pathlib import Path

from apd_ext.tiny.vocab import known_words, unknown_words, vocabulary_summary

__all__ = ["paths", "test_file", "test_file_1op", "tokenizer", "DEFAULTS", "apd_config",
           "known_words", "unknown_words", "vocabulary_summary"]

_DATA = Path(__file__).resolve().parent.parent / "data"

# The one set of decoding settings for the embedded pair: `apd demo`, `apd
# generate` and `apd serve` on it, `apd sweep`'s centre and the README's
# snippets. Greedy: the task has one right answer, and sampling only loses
# accuracy. R, W, M: measured by `apd sweep` (README, "The embedded tiny
# model pair"): M=56 (the whole answer budget) gives the most tokens per dLLM
# forward at the same accuracy as smaller M; R=0.7 keeps the K=1 accuracy.
DEFAULTS = {"R": 0.7, "W": 16, "M": 56, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 56}


def apd_config(**overrides):
    """An APDConfig with the embedded pair's DEFAULTS (keyword overrides win)."""
    from apd_ext.config import APDConfig

    return APDConfig(**{**DEFAULTS, **overrides})


def paths() -> tuple[Path, Path]:
    """(dllm_dir, ar_dir): the shipped HF checkpoint folders."""
    return _DATA / "tiny" / "dllm", _DATA / "tiny" / "ar"


def test_file() -> Path:
    """The 500 fixed test problems (JSONL: question, answer, final)."""
    return _DATA / "arith_test.jsonl"


def test_file_1op() -> Path:
    """The 200 one-event held-out problems (varied phrasings; JSONL as test_file)."""
    return _DATA / "arith_test_1op.jsonl"


def tokenizer(folder=None):
    """The pair's tokenizer (default: from the dLLM folder).

    Loaded as the PreTrainedTokenizerFast its tokenizer_config.json names,
    not through AutoTokenizer: AutoTokenizer also parses config.json, and on
    a `model_type: "Dream"` folder transformers then logs "model of type
    `Dream` to instantiate a model of type ``" and a rope_scaling
    FutureWarning on every load. It would also map any `model_type: qwen2`
    folder (the AR one) to Qwen2Tokenizer, whose hard-coded pre-tokenizer
    splits digits and so would not reproduce these ids.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder or paths()[0]), local_files_only=True)
