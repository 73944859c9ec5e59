"""Loops of one kernel in `cuobjdump -sass` output: for every backward branch,
the instructions between its target and the branch (one trip of the loop
body), with the counts that matter for the sampler (bench/NOTES.md).

    cuobjdump -sass sampling.cubin > sampling.sass
    python bench/sass_loops.py sampling.sass sample_draft_kernelINS_6bf16 [--min 100]

A trip of a loop whose body contains inner loops counts the inner bodies once
(static instructions, not dynamic ones); the sampler's per-element loops are
straight-line bodies apart from the CAS retry loops of 64-bit shared atomics,
which are listed as loops of their own.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
TARGET = re.compile(r"0x([0-9a-f]+)")
KEYS = ("MUFU", "FFMA", "FMUL", "FADD", "LDL", "STL", "ATOMS", "LDG", "LDS", "STS", "SHFL", "MATCH", "VOTE", "BAR", "I2F", "F2I", "F2F", "FCHK",
        "CALL", "BSSY")


def functions(text: str) -> dict[str, list[tuple[int, str, str]]]:
    out: dict[str, list[tuple[int, str, str]]] = {}
    cur = None
    for line in text.splitlines():
        if "Function :" in line:
            cur = line.split("Function :")[1].strip()
            out[cur] = []
            continue
        m = INSN.search(line)
        if cur and m:
            out[cur].append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sass")
    ap.add_argument("kernel", help="substring of the mangled kernel name")
    ap.add_argument("--min", type=int, default=100, help="list loops with at least this many instructions")
    a = ap.parse_args()
    funcs = functions(open(a.sass).read())
    names = [n for n in funcs if a.kernel in n]
    if len(names) != 1:
        sys.exit(f"{len(names)} kernels match {a.kernel!r}: {list(funcs)}")
    insns = funcs[names[0]]
    pcs = [pc for pc, _, _ in insns]
    total = Counter(op.split(".")[0] for _, op, _ in insns)
    print(f"{names[0]}: {len(insns)} instructions;",
          ", ".join(f"{k} {total[k]}" for k in KEYS if total[k]))
    print("ATOMS.CAST.SPIN.64 sites:", sum(1 for _, op, _ in insns if op.startswith("ATOMS.CAST.SPIN.64")))
    # Code after the last EXIT is out of line (CAS retry blocks, slow paths of
    # the IEEE division); its branches back into the body are not loops.
    body_end = max(pc for pc, op, _ in insns if op.startswith("EXIT"))
    for i, (pc, op, args) in enumerate(insns):
        if not op.startswith("BRA") or pc > body_end:
            continue
        t = TARGET.search(args)
        if not t or int(t.group(1), 16) >= pc:
            continue
        lo = pcs.index(int(t.group(1), 16)) if int(t.group(1), 16) in pcs else None
        if lo is None:
            continue
        body = insns[lo : i + 1]
        if len(body) < a.min:
            continue
        c = Counter(o.split(".")[0] for _, o, _ in body)
        spins = sum(1 for _, o, _ in body if o.startswith("ATOMS.CAST.SPIN"))
        print(f"  loop {insns[lo][0]:#07x}-{pc:#07x}: {len(body)} instructions;",
              ", ".join(f"{k} {c[k]}" for k in KEYS if c[k]), f"; CAS-spin {spins}" if spins else "")


if __name__ == "__main__":
    main()
