"""What the embedded tiny pair knows: the words of its training task.

The pair was trained only on :mod:`apd_ext.tasks.arith` word problems, so any
other word is out of distribution. The word list is read off the task's own
generator (problems drawn from a fixed seed), so it follows the templates if
they change; numbers are checked against the task's value range.
"""

from __future__ import annotations

import functools
import random
import re

_WORD = re.compile(r"[A-Za-z]+|\d+")
_N_SAMPLES = 3000  # enough draws to hit every name, object, friend and event template


@functools.lru_cache(maxsize=1)
def known_words() -> frozenset:
    """Lower-cased words of the prompts the pair was trained on."""
    from apd_ext.tasks import arith

    rng = random.Random("apd_ext.tiny.vocab")
    words = {"question", "answer"}  # the prompt frame (arith.prompt_of)
    for _ in range(_N_SAMPLES):  # both styles the pair is trained on (arith: plain and varied)
        for pr in (arith.generate_problem(rng), arith.generate_varied(rng)):
            words.update(w.lower() for w in _WORD.findall(pr.question) if not w.isdigit())
    return frozenset(words)


def unknown_words(text: str) -> list:
    """Words of `text` outside the training vocabulary, and numbers outside
    1..50, in order of first appearance, without repeats."""
    from apd_ext.tasks import arith

    known = known_words()
    out = []
    for w in _WORD.findall(text):
        bad = (not 1 <= int(w) <= arith._MAXV) if w.isdigit() else w.lower() not in known
        if bad and w not in out:
            out.append(w)
    return out


def vocabulary_summary() -> str:
    """One paragraph for --help and the README."""
    from apd_ext.tasks import arith

    names = ", ".join(p[0] for p in arith._PEOPLE)
    return (
        "knows only its training task: arithmetic word problems such as 'Ava has 12 apples. She buys 3 more "
        "apples. She gives 4 apples to Max. How many apples does Ava have now?', numbers 1 to 50. "
        f"Names: {names}; friends: {', '.join(arith._FRIENDS)}. Objects: {', '.join(arith._OBJECTS)}. "
        "Names and friends are also subjects and givers. Verbs: has, buys, finds, gets (from), gives (to, away), "
        "loses, sells (to), doubles, triples, splits ... into N equal groups and keeps one group; questions "
        "'How many OBJECTS does NAME (or he / she) have now?', '... have left?', 'How many OBJECTS are left?'. "
        "Other words are out of its vocabulary (`apd generate` warns)."
    )
