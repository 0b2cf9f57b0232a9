#!/usr/bin/env python
"""Plot the loss of one or several runs against iterations, tokens, training FLOPs and wall-clock (PNG).

    python tools/plot_run.py runs/base.jsonl runs/est.jsonl --out loss.png
    python tools/plot_run.py baseline=docs/repro/study-h64/baseline-s0.jsonl est=docs/repro/study-h64/est-s0.jsonl \\
        control=docs/repro/study-h64/control-i1800-s0.jsonl --axes flops time --out cmp.png

Each argument is a --metrics-file, optionally NAME=PATH (default name: the file name without .jsonl).
Training loss is the thin line, validation loss (full model) the dots.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_est.study.curves import AXES, plot_runs, read_curves  # noqa: E402


def _named(arg: str) -> tuple[str, str]:
    name, sep, path = arg.partition("=")
    if not sep:
        name, path = os.path.basename(arg).removesuffix(".jsonl"), arg
    return name, path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics files, each PATH or NAME=PATH")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--axes", nargs="+", choices=list(AXES), default=list(AXES))
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    runs = {}
    for arg in args.metrics:
        name, path = _named(arg)
        if not os.path.isfile(path):
            print(f"error: metrics file {path}: not found", file=sys.stderr)
            return 2
        try:
            runs[name] = read_curves(path)
        except (ValueError, KeyError) as e:
            print(f"error: metrics file {path}: {e if isinstance(e, ValueError) else 'missing field ' + str(e)}",
                  file=sys.stderr)
            return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot_runs(runs, args.out, tuple(args.axes), args.title)
    print(f"wrote {args.out} ({len(runs)} runs; x: {', '.join(args.axes)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
