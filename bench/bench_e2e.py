"""End-to-end APD benchmark: one APD step and whole generations, our loop vs
the transformers reference loop on the same random weights, with a fixed
acceptance schedule (see apd_ext/decoding/bench.py for what each row means).

    python bench/bench_e2e.py --device cpu                   # tiny shapes
    python bench/bench_e2e.py --device cuda --markdown out.md  # Dream-7B + Qwen2.5-0.5B shapes

`apd bench` runs the same with a progress bar and writes a CSV and a plot.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from apd_ext.decoding import bench  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(ap)
    ap.add_argument("--csv", default=None, help="also write the rows as CSV")
    args = ap.parse_args(argv)
    rows = bench.run(args, progress=sys.stderr.isatty())
    bench.print_table(rows, args)
    if args.csv:
        bench.write_csv(rows, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
