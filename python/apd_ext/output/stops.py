"""Stop strings on the host, per step, over the newly decoded text.

RequestText is one request's output path: its IncrementalDetokenizer, its stop
strings and how much text was already handed out. Each step:

1. the step's ids up to (not including) the first stop id go through the
   detokenizer (complete characters only);
2. the stop strings are searched only where a new match can lie: from
   max_stop_len - 1 characters before the previous end of the text (an
   occurrence wholly inside the older text was found a step earlier), so a
   step costs O(new text + stops * max_stop_len), not O(text);
3. a match ends the request: the text is cut before the earliest match
   (OpenAI semantics: the stop string itself is not returned);
4. otherwise the delta handed out stops short of the longest tail of the
   text that is a prefix of some stop string (it may yet become one), so no
   client ever sees text that is later retracted. At the end of the request
   everything left is handed out.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

from apd_ext.output.detokenizer import IncrementalDetokenizer


def check_stop_strings(stop, name: str = "stop") -> Tuple[str, ...]:
    """None, a non-empty string or a list of them -> a tuple (ValueError naming `name`)."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"{name}: expected a non-empty string or a list of non-empty strings, got {stop!r}")
    return tuple(dict.fromkeys(items))  # order kept, duplicates dropped


class RequestText:
    """tok: a transformers tokenizer; stops: stop strings; stop_ids: ids that end
    the request (EOS and the like, never part of the text)."""

    def __init__(self, tok, stops: Sequence[str] = (), stop_ids: Iterable[int] = ()):
        self.detok = IncrementalDetokenizer(tok)
        self.stops = tuple(stops)
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.stop_ids = frozenset(stop_ids)
        self.sent = 0  # characters of detok.text already handed out
        self.checked = 0  # detok.text[:checked] holds no stop string
        self.end: Optional[int] = None  # the cut, once a stop string matched
        self.stop_string: Optional[str] = None

    @property
    def text(self) -> str:
        """The request's text so far (cut before a matched stop string)."""
        return self.detok.text if self.end is None else self.detok.text[: self.end]

    def update(self, new_ids: Sequence[int], finished: bool) -> Tuple[str, bool]:
        """-> (text delta to hand out, whether a stop string ended the request)."""
        if self.end is not None:
            return "", True
        ids = list(new_ids)
        for k, t in enumerate(ids):
            if t in self.stop_ids:
                ids = ids[:k]
                break
        self.detok.update(ids)
        if finished:
            self.detok.finish()
        text = self.detok.text
        if self.stops and len(text) > self.checked:
            start = max(0, self.checked - self.max_stop + 1)
            hits = [(i, s) for s in self.stops for i in (text.find(s, start),) if i >= 0]
            self.checked = len(text)
            if hits:
                self.end, self.stop_string = min(hits)
                delta, self.sent = text[self.sent: self.end], self.end
                return delta, True
        upto = len(text) if finished else len(text) - self._pending(text)
        if upto <= self.sent:
            return "", False
        delta, self.sent = text[self.sent: upto], upto
        return delta, False

    def _pending(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        for k in range(min(self.max_stop - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
