"""The real-vocabulary fixture (tests/qwen_vocab.py) is the real Qwen BPE: its
encodings equal tiktoken's own encoder over the same ranks and pattern, and the
special tokens sit at their published ids."""
from __future__ import annotations

import pytest

from qwen_vocab import (DREAM_EXTRA, N_RANKS, QWEN2_PATTERN, QWEN3_EXTRA, QWEN25_SPECIALS, dream_tokenizer,
                        qwen3_tokenizer, qwen25_tokenizer, ranks_file)

TEXTS = [
    "Hello, world! 12345",
    "你好，世界。今天天气很好。",
    "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧 sequences",
    "Question: Ben has 20 cards.\n\nAnswer:\n#### 15",
    "  leading spaces\ttabs\r\nCRLF  ",
    "日本語のテキストと한국어 텍스트",
]


@pytest.fixture(scope="module")
def tiktoken_enc():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    return tiktoken.Encoding("qwen-ranks", pat_str=QWEN2_PATTERN, mergeable_ranks=load_tiktoken_bpe(ranks_file()),
                             special_tokens={})


@pytest.mark.parametrize("text", TEXTS)
def test_encodings_equal_tiktoken(tiktoken_enc, text):
    tok = qwen25_tokenizer()
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == tiktoken_enc.encode(text)
    assert tok.decode(ids) == text


def test_special_token_ids():
    q25, q3, dream = qwen25_tokenizer(), qwen3_tokenizer(), dream_tokenizer()
    for i, s in enumerate(QWEN25_SPECIALS):
        assert q25.convert_tokens_to_ids(s) == N_RANKS + i
    assert [q3.convert_tokens_to_ids(s) for s in QWEN3_EXTRA] == [151665, 151666, 151667, 151668]
    assert [dream.convert_tokens_to_ids(s) for s in DREAM_EXTRA] == [151665, 151666]
    assert dream.mask_token_id == 151666 and q25.eos_token_id == 151643
    assert len(q25) == 151665 and len(q3) == 151669 and len(dream) == 151667
    # Known ids of the published vocabulary (Qwen2.5 tokenizer.json).
    assert q25("Hello", add_special_tokens=False).input_ids == [9707]
    assert q25(" world", add_special_tokens=False).input_ids == [1879]
