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
