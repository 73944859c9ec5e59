"""GSM8K-style arithmetic word problems, generated from seeds.

Every problem is a short templated story: a person starts with some objects,
then events change the count (buy, find, receive, give, lose, sell,
double/triple, share into equal groups). The answer lists one line per event
with its arithmetic and ends with ``#### <number>``, as GSM8K does. All
intermediate values stay in [1, 50] so a tiny model can learn the facts.

Two styles share the events and the answer format:
  "plain"   (the original distribution, bit-identical draws): 2 to 4 events,
            one phrasing each, "How many OBJ does NAME have now?";
  "varied"  1 to 4 events (``n_ops``), more phrasings of the same events
            ("buys 3 apples", "gets 3 more apples", "gives away 3 apples",
            any name or friend as giver) and questions ending "... now?" or
            "... left?" -- the kind of question a first user types.

Splits cannot overlap by construction: a problem belongs to the test split
iff a SHA-256 of its question text falls in the test bucket; the train stream
rejects those problems and the test stream keeps only them.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

__all__ = [
    "Problem", "generate_problem", "generate_varied", "split_of", "stream", "make_split",
    "extract_answer", "score", "prompt_of", "load_jsonl", "save_jsonl",
]

# (name, subject pronoun, possessive pronoun, object pronoun)
_PEOPLE = [
    ("Ava", "She", "her", "her"), ("Ben", "He", "his", "him"),
    ("Cara", "She", "her", "her"), ("Dan", "He", "his", "him"),
    ("Eva", "She", "her", "her"), ("Finn", "He", "his", "him"),
    ("Gina", "She", "her", "her"), ("Hugo", "He", "his", "him"),
    ("Ivy", "She", "her", "her"), ("Jack", "He", "his", "him"),
    ("Kate", "She", "her", "her"), ("Leo", "He", "his", "him"),
    ("Mia", "She", "her", "her"), ("Noah", "He", "his", "him"),
    ("Olga", "She", "her", "her"), ("Paul", "He", "his", "him"),
    ("Rosa", "She", "her", "her"), ("Sam", "He", "his", "him"),
    ("Tina", "She", "her", "her"), ("Omar", "He", "his", "him"),
]
_OBJECTS = [
    "apples", "pens", "books", "coins", "cards", "eggs", "shells", "stamps",
    "marbles", "cookies", "stickers", "toys", "pencils", "balls", "cups",
    "flowers", "rocks", "candies", "boxes", "shirts",
]
_FRIENDS = ["Zoe", "Max", "Lily", "Tom", "Nina", "Alex", "Ruby", "Ian"]
# Friends' pronouns, so that the varied style can also make them the subject.
_FRIEND_PEOPLE = [
    ("Zoe", "She", "her", "her"), ("Max", "He", "his", "him"), ("Lily", "She", "her", "her"),
    ("Tom", "He", "his", "him"), ("Nina", "She", "her", "her"), ("Alex", "He", "his", "him"),
    ("Ruby", "She", "her", "her"), ("Ian", "He", "his", "him"),
]
_MAXV = 50
_TEST_BUCKETS = 8  # 1 in 8 questions hashes into the test split


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str      # step-by-step solution ending "#### <number>"
    final: int

    def to_dict(self) -> dict:
        return asdict(self)


def _step(rng: random.Random, cur: int, p: tuple, obj: str) -> tuple[str, str, int] | None:
    """One event: (question sentence, answer line, new value) or None if it does not fit."""
    name, he, his, him = p
    kind = rng.choice(["buy", "find", "get", "give", "lose", "sell", "mul", "share"])
    friend = rng.choice(_FRIENDS)
    if kind in ("buy", "find", "get"):
        b = rng.randint(1, 10)
        if cur + b > _MAXV:
            return None
        q = {"buy": f"{he} buys {b} more {obj}.",
             "find": f"{he} finds {b} more {obj}.",
             "get": f"{friend} gives {him} {b} {obj}."}[kind]
        label = {"buy": "Buys", "find": "Finds", "get": "Gets"}[kind]
        return q, f"{label} {b}: {cur} + {b} = {cur + b}.", cur + b
    if kind in ("give", "lose", "sell"):
        if cur < 2:
            return None
        b = rng.randint(1, min(10, cur - 1))
        q = {"give": f"{he} gives {b} {obj} to {friend}.",
             "lose": f"{he} loses {b} {obj}.",
             "sell": f"{he} sells {b} {obj}."}[kind]
        label = {"give": "Gives", "lose": "Loses", "sell": "Sells"}[kind]
        return q, f"{label} {b}: {cur} - {b} = {cur - b}.", cur - b
    return _mul_or_share(rng, kind, cur, he, his, obj)


def _mul_or_share(rng: random.Random, kind: str, cur: int, he: str, his: str, obj: str):
    if kind == "mul":
        k = rng.choice([2, 3])
        if cur * k > _MAXV:
            return None
        q = f"{he} {'doubles' if k == 2 else 'triples'} {his} {obj}."
        return q, f"{'Doubles' if k == 2 else 'Triples'}: {cur} * {k} = {cur * k}.", cur * k
    # share: split into k equal groups, keep one
    ks = [k for k in (2, 3, 4) if cur % k == 0 and cur // k >= 1]
    if not ks:
        return None
    k = rng.choice(ks)
    q = f"{he} splits {his} {obj} into {k} equal groups and keeps one group."
    return q, f"Splits in {k}: {cur} / {k} = {cur // k}.", cur // k


def generate_problem(rng: random.Random) -> Problem:
    """Draws one problem from ``rng`` (2 to 4 arithmetic steps)."""
    p = rng.choice(_PEOPLE)
    obj = rng.choice(_OBJECTS)
    n_steps = rng.randint(2, 4)
    cur = rng.randint(2, 20)
    sents = [f"{p[0]} has {cur} {obj}."]
    lines = [f"Starts with {cur}."]
    while len(lines) - 1 < n_steps:
        out = _step(rng, cur, p, obj)
        if out is None:
            continue
        q, a, cur = out
        sents.append(q)
        lines.append(a)
    sents.append(f"How many {obj} does {p[0]} have now?")
    lines.append(f"#### {cur}")
    return Problem(" ".join(sents), "\n".join(lines), cur)

def _step_varied(rng: random.Random, cur: int, p: tuple, obj: str) -> tuple[str, str, int] | None:
    """One event in one of several phrasings; the answer line is the plain style's."""
    name, he, his, him = p
    kind = rng.choice(["buy", "find", "get", "give", "lose", "sell", "mul", "share"])
    others = [q[0] for q in _PEOPLE + _FRIEND_PEOPLE if q[0] != name]
    friend = rng.choice(others)
    if kind in ("buy", "find", "get"):
        b = rng.randint(1, 10)
        if cur + b > _MAXV:
            return None
        more = rng.choice(["more ", ""])
        q = {"buy": f"{he} buys {b} {more}{obj}.",
             "find": f"{he} finds {b} {more}{obj}.",
             "get": rng.choice([f"{friend} gives {him} {b} {obj}.", f"{friend} gives {him} {b} more {obj}.",
                                f"{he} gets {b} {more}{obj}.", f"{he} gets {b} {obj} from {friend}."])}[kind]
        label = {"buy": "Buys", "find": "Finds", "get": "Gets"}[kind]
        return q, f"{label} {b}: {cur} + {b} = {cur + b}.", cur + b
    if kind in ("give", "lose", "sell"):
        if cur < 2:
            return None
        b = rng.randint(1, min(10, cur - 1))
        q = {"give": rng.choice([f"{he} gives {b} {obj} to {friend}.", f"{he} gives away {b} {obj}.",
                                 f"{he} gives {friend} {b} {obj}."]),
             "lose": f"{he} loses {b} {obj}.",
             "sell": rng.choice([f"{he} sells {b} {obj}.", f"{he} sells {b} {obj} to {friend}."])}[kind]
        label = {"give": "Gives", "lose": "Loses", "sell": "Sells"}[kind]
        return q, f"{label} {b}: {cur} - {b} = {cur - b}.", cur - b
    return _mul_or_share(rng, kind, cur, he, his, obj)


# How often each event count is drawn in the varied style: one-event questions
# are the most common first question, and the 2-4 events keep what the pair knew.
N_OPS_WEIGHTS = {1: 4, 2: 2, 3: 2, 4: 2}


def generate_varied(rng: random.Random, n_ops: int | None = None) -> Problem:
    """Draws one problem of the varied style (``n_ops`` events, else drawn by N_OPS_WEIGHTS)."""
    if n_ops is None:
        n_ops = rng.choices(list(N_OPS_WEIGHTS), weights=list(N_OPS_WEIGHTS.values()))[0]
    if not 1 <= n_ops <= 4:
        raise ValueError(f"n_ops: expected 1 to 4, got {n_ops}")
    p = rng.choice(_PEOPLE + _FRIEND_PEOPLE)
    obj = rng.choice(_OBJECTS)
    cur = rng.randint(2, 20)
    sents = [f"{p[0]} has {cur} {obj}."]
    lines = [f"Starts with {cur}."]
    down = False
    while len(lines) - 1 < n_ops:
        out = _step_varied(rng, cur, p, obj)
        if out is None:
            continue
        q, a, cur = out
        down = a.split(" ", 1)[0] in ("Gives", "Loses", "Sells")
        sents.append(q)
        lines.append(a)
    ends = [f"How many {obj} does {p[0]} have now?", f"How many {obj} does {p[1].lower()} have now?"]
    if down:  # "left" only reads right after something went away
        ends += [f"How many {obj} does {p[0]} have left?", f"How many {obj} are left?"]
    sents.append(rng.choice(ends))
    lines.append(f"#### {cur}")
    return Problem(" ".join(sents), "\n".join(lines), cur)


def split_of(question: str) -> str:
    """'test' or 'train', a pure function of the question text."""
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "little")
    return "test" if h % _TEST_BUCKETS == 0 else "train"


def stream(split: str, seed: int, style: str = "plain", n_ops: int | None = None) -> Iterator[Problem]:
    """Endless deterministic stream of problems of one split.

    ``style="plain"`` is the original 2-4-event distribution (the shipped
    held-out file is its test split, seed 0); ``"varied"`` draws
    :func:`generate_varied` with ``n_ops`` events (None: 1 to 4).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    if style not in ("plain", "varied"):
        raise ValueError(f"style: expected 'plain' or 'varied', got {style!r}")
    if style == "plain" and n_ops is not None:
        raise ValueError("n_ops: only the 'varied' style takes it")
    tag = f"arith/{split}/{seed}" if style == "plain" else f"arith-varied/{n_ops}/{split}/{seed}"
    rng = random.Random(tag)
    while True:
        pr = generate_problem(rng) if style == "plain" else generate_varied(rng, n_ops)
        if split_of(pr.question) == split:
            yield pr


def make_split(split: str, n: int, seed: int, unique: bool = True, style: str = "plain",
               n_ops: int | None = None) -> list[Problem]:
    """First ``n`` problems of a split's stream (deduplicated when ``unique``)."""
    out, seen = [], set()
    for pr in stream(split, seed, style, n_ops):
        if unique:
            if pr.question in seen:
                continue
            seen.add(pr.question)
        out.append(pr)
        if len(out) == n:
            return out
    return out


def prompt_of(question: str) -> str:
    """The text the models are conditioned on; the answer follows it directly."""
    return f"Question: {question}\nAnswer:\n"


_FINAL = re.compile(r"####\s*(-?\d+)")


def extract_answer(text: str) -> int | None:
    """The number after the first ``####`` in ``text``, or None."""
    m = _FINAL.search(text)
    return int(m.group(1)) if m else None


def score(text: str, final: int) -> bool:
    """Exact match of the generated final number against the reference."""
    got = extract_answer(text)
    return got is not None and got == int(final)


def save_jsonl(problems: list[Problem], path: str | Path) -> None:
    with open(path, "w") as f:
        for pr in problems:
            f.write(json.dumps(pr.to_dict()) + "\n")


def load_jsonl(path: str | Path) -> list[Problem]:
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            d = json.loads(line)
            try:
                out.append(Problem(d["question"], d["answer"], int(d["final"])))
            except KeyError as e:
                raise ValueError(f"{path}:{i + 1}: missing field {e}") from None
    return out
