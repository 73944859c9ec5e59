#!/usr/bin/env python3
"""SASS instruction counts of the mma attention kernels (bench/NOTES.md).

    CUOBJDUMP=.../cuobjdump python bench/sass_counts.py attention_mma_bf16.o

Per kernel: the whole function, and the key-tile loop body, taken as the
span from the first to the last HMMA (the loop is fully unrolled per tile).
cuobjdump needs nvdisasm on PATH (or NVDISASM_PATH); pip's
nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels carry both."""
import re, subprocess, sys, collections, os
CUOBJDUMP = os.environ.get("CUOBJDUMP", "cuobjdump")
def funcs(obj):
    out = subprocess.run([CUOBJDUMP, "-sass", obj], capture_output=True, text=True, check=True).stdout
    for f in re.split(r"\n\s+Function : ", out)[1:]:
        name = f.split("\n", 1)[0].strip()
        ins = []
        for line in f.split("\n"):
            m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
            if m and not m.group(2).startswith("NOP"):
                ins.append(m.group(2).split(".")[0])
        yield name, ins
for obj in sys.argv[1:]:
    for name, ins in funcs(obj):
        if "mma_kernel" not in name: continue
        h = [i for i, op in enumerate(ins) if op == "HMMA"]
        body = ins[h[0]:h[-1] + 1]
        c = collections.Counter(body)
        keys = ["HMMA", "LDSM", "LDGSTS", "MUFU", "FMUL", "FFMA", "FMNMX", "FSEL", "F2FP", "SHFL", "BAR"]
        d = re.search(r"Li(\d+)E", name).group(1)
        print(f"{os.path.basename(obj)} D={d}: whole {len(ins)} instr; "
              f"HMMA region {len(body)} instr = {len(body) / c['HMMA']:.2f} per HMMA; " +
              ", ".join(f"{k} {c[k]}" for k in keys))
