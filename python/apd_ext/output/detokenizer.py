"""Incremental detokenization: a growing id list -> text deltas, O(new ids) per step.

Algorithm (as vLLM's v1 "slow" detokenizer; written here from its description):
the ids so far are split by two offsets, prefix <= read. ids[prefix:read] is
a few already-emitted tokens kept only as decoding context (byte-level BPE and
word-piece decoders render a token differently at the start of a string: a
leading space, a merged byte sequence): it is the previous emitted chunk. Each update decodes ids[prefix:] once
and ids[prefix:read] once (both short) and emits the extension. If the new
text ends in U+FFFD, the last ids hold an incomplete UTF-8 sequence (half of a
CJK character or an emoji split across byte tokens): nothing is emitted and
the offsets stay, so the bytes are decoded together once the character
completes. finish() flushes a tail that never completed (it then reads as the
U+FFFD a full decode gives too).

Cost: each update decodes about (read - prefix) + new ids, independent of the
length of the text; emitting advances prefix to the old read and read to the
end, so the context window is one step's ids.

Invariant (tested on the real Qwen vocabulary with CJK / emoji): the
concatenation of all deltas plus finish() equals tok.decode(all ids,
skip_special_tokens=True). UTF-8 is self-synchronising, so a boundary where the
decoded text ends in a complete character splits the full decode there.
"""
from __future__ import annotations

from typing import Iterable, List

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """tok: a transformers tokenizer. Special ids (tok.all_special_ids) are
    dropped as decode(skip_special_tokens=True) drops them."""

    def __init__(self, tok, skip_special_tokens: bool = True):
        self.tok = tok
        self.skip = frozenset(getattr(tok, "all_special_ids", ()) or ()) if skip_special_tokens else frozenset()
        self.ids: List[int] = []
        self.prefix = 0  # ids[prefix:read]: emitted context
        self.read = 0  # ids[read:]: not yet emitted
        self.text = ""  # everything emitted so far

    def _decode(self, ids: List[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def update(self, new_ids: Iterable[int]) -> str:
        """Append ids; returns the newly complete text (maybe "")."""
        self.ids.extend(int(i) for i in new_ids if int(i) not in self.skip)
        if len(self.ids) == self.read:
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return ""  # an incomplete character at the end: wait for its other bytes
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The held-back tail (an incomplete character at the very end), as a full decode renders it."""
        if len(self.ids) == self.read:
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        delta = after[len(before):]
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta
