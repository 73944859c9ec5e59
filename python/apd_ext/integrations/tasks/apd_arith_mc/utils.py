"""The apd_arith_mc lm-eval task: its data builder and loader (loaded by lm-eval through `!function`).

Each item is one apd_ext.tasks.arith test problem, cloze style: the context is
the prompt `apd sweep` uses ("Question: ...\\nAnswer:\\n") followed by the
worked solution up to the "=" of its last step; the four choices are numbers,
the step's true result (= the problem's final answer) and three distractors
(off by one or two, off by ten, or the step's other operations), in a seeded
random order. `python -m apd_ext.integrations.tasks.apd_arith_mc.utils` rebuilds
the shipped arith_mc_test.jsonl from the generator (fixed seed).
"""
from __future__ import annotations

import json
import os
import random
import re
import sys
from pathlib import Path

# Importing the integration registers the "apd" model, so that
# `lm_eval --model apd --tasks .../apd_arith_mc.yaml` needs no user import.
import apd_ext.integrations.lm_eval  # noqa: F401

DATA = Path(__file__).resolve().parent / "arith_mc_test.jsonl"
N_ITEMS, SEED = 150, 26
# The last line of a worked solution before "#### N": "<Label> <b>: <a> <op> <b> = <r>."
_LAST_STEP = re.compile(r"^(.*: (\d+) ([-+*/]) (\d+) =) (\d+)\.$")


def distractors(a: int, op: str, b: int, r: int, rng: random.Random) -> list:
    """Three distinct plausible wrong results of `a op b = r`, non-negative."""
    other = {"+": a - b, "-": a + b, "*": a + b, "/": a * b}[op]
    cands = sorted({r - 2, r - 1, r + 1, r + 2, r - 10, r + 10, other} - {r})
    cands = [c for c in cands if c >= 0]
    return rng.sample(cands, 3)


def build_items(n: int = N_ITEMS, seed: int = SEED) -> list:
    """n multiple-choice items from the arith test split's stream (seeded, deterministic)."""
    from apd_ext.tasks import arith

    rng = random.Random(f"arith_mc/{seed}")
    items = []
    for pr in arith.make_split("test", n, seed=seed):
        *steps, last, final_line = pr.answer.split("\n")
        m = _LAST_STEP.match(last)
        if m is None or final_line != f"#### {pr.final}" or int(m.group(5)) != pr.final:
            raise ValueError(f"unexpected worked solution: {pr.answer!r}")
        a, op, b = int(m.group(2)), m.group(3), int(m.group(4))
        choices = [pr.final] + distractors(a, op, b, pr.final, rng)
        rng.shuffle(choices)
        items.append({"question": pr.question, "worked": "\n".join(steps + [m.group(1)]),
                      "choices": [str(c) for c in choices], "label": choices.index(pr.final),
                      "final": pr.final})
    return items


def load_json(data_files=None, **_metadata):
    """datasets' json builder over data_files; relative names live in this task's folder."""
    import datasets

    files = data_files or {"test": DATA.name}
    if isinstance(files, str):
        files = {"test": files}
    files = {k: v if os.path.isabs(v) else os.fspath(DATA.parent / v) for k, v in files.items()}
    for split, path in files.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data_files[{split!r}]: no such file {path}")
    return datasets.load_dataset("json", data_files=files)


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DATA
    with open(out, "w") as f:
        for it in build_items():
            f.write(json.dumps(it) + "\n")
    print(f"wrote {N_ITEMS} items to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
