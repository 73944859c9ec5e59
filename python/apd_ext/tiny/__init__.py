"""The embedded tiny model pair: a dLLM (Dream layout) and its AR verifier,
trained on :mod:`apd_ext.tasks.arith` word problems and shipped as package data.
"""

from __future__ import annotations

from pathlib import Path

_DATA = Path(__file__).resolve().parent.parent / "data"


def paths() -> tuple[Path, Path]:
    """(dllm_dir, ar_dir): the shipped HF checkpoint folders."""
    return _DATA / "tiny" / "dllm", _DATA / "tiny" / "ar"


def test_file() -> Path:
    """The 500 fixed test problems (JSONL: question, answer, final)."""
    return _DATA / "arith_test.jsonl"


def tokenizer():
    """The pair's tokenizer, loaded with AutoTokenizer from the dLLM folder.

    Both folders ship the same tokenizer.json. Load it from the dLLM folder (as
    `apd generate` does): transformers >= 5 maps every model_type "qwen2"
    folder to Qwen2Tokenizer, whose hard-coded pre-tokenizer splits digits,
    so AutoTokenizer on the AR folder would not reproduce these ids.
    """
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(paths()[0]), local_files_only=True)
