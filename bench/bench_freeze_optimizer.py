#!/usr/bin/env python
"""What freeze's optimizer step on sliced weights costs against a fused AdamW step over the whole tensors.

    OMP_NUM_THREADS=1 python bench/bench_freeze_optimizer.py                 # GPT-2 124M layer shapes, 12 layers

The tensors are the 48 sliced weights of a GPT-2 124M EST stage-2 step (per layer: QKV 2304 x 768 and fc1 3072 x
768 sliced along rows, the attention output 768 x 768 and fc2 768 x 3072 along columns; half of each kept, at
random), with value, gradient and both AdamW moments. Routes, timed interleaved round by round (median CPU s):
  full         torch's fused AdamW kernel over the whole tensors (what adamw mode and the full model pay)
  compact      what freeze does (est/unsampled.py Narrowed): gather the kept slices of value, gradient and
               moments, fused step on the copies, scatter value and moments back
  compact-pre  the same into preallocated buffers (is it allocation?)
  where        a full fused step, then the frozen elements restored from saved copies with torch.where
  gathers / scatters   the compact route's index operations alone
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from bench.common import median  # noqa: E402

SHAPES = (((2304, 768), 0), ((768, 768), 1), ((3072, 768), 0), ((768, 3072), 1))


def _tensors(layers: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for shape, dim in SHAPES * layers:
        idx = torch.randperm(shape[dim], generator=g)[: shape[dim] // 2].sort().values
        keep = torch.zeros(shape[dim], dtype=torch.bool)
        keep[idx] = True
        view = [1, 1]
        view[dim] = -1
        t = {k: torch.randn(shape, generator=g) for k in "pgm"}
        t["v"] = torch.rand(shape, generator=g)
        out.append(dict(t, dim=dim, idx=idx, keep=keep.view(view)))
    return out


def _fused(ps, gs, ms, vs) -> None:
    torch._fused_adamw_(ps, gs, ms, vs, [], [torch.tensor(5.0) for _ in ps], lr=1e-3, beta1=0.9, beta2=0.95,
                        weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)


def routes(T: list[dict]) -> dict:
    bufs = [[torch.empty_like(t[k].index_select(t["dim"], t["idx"])) for k in "pgmv"] for t in T]

    def full():
        _fused(*[[t[k] for t in T] for k in "pgmv"])

    def gathers():
        for t, b in zip(T, bufs):
            for k, x in zip("pgmv", b):
                torch.index_select(t[k], t["dim"], t["idx"], out=x)

    def scatters():
        for t, b in zip(T, bufs):
            for k, x in zip("pmv", (b[0], b[2], b[3])):
                t[k].index_copy_(t["dim"], t["idx"], x)

    def compact():
        cs = [[t[k].index_select(t["dim"], t["idx"]) for k in "pgmv"] for t in T]
        _fused(*[list(x) for x in zip(*cs)])
        for t, c in zip(T, cs):
            for k, x in zip("pmv", (c[0], c[2], c[3])):
                t[k].index_copy_(t["dim"], t["idx"], x)

    def compact_pre():
        gathers()
        _fused(*[list(x) for x in zip(*bufs)])
        scatters()

    def where():
        saved = [[t[k].clone() for k in "pmv"] for t in T]
        full()
        for t, s in zip(T, saved):
            for k, x in zip("pmv", s):
                torch.where(t["keep"], t[k], x, out=t[k])

    return {"full": full, "compact": compact, "compact-pre": compact_pre, "where": where, "gathers": gathers,
            "scatters": scatters}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fns = routes(_tensors(args.layers))
    times = {k: [] for k in fns}
    for rnd in range(args.reps + 1):  # round 0 warms up
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            if rnd:
                times[k].append(time.process_time() - t0)
    base = median(times["full"])
    print(f"# bench_freeze_optimizer: {len(SHAPES) * args.layers} sliced weights, half kept, threads {args.threads}, "
          f"reps {args.reps}, load average at end {os.getloadavg()[0]:.1f}")
    print("| route | median CPU s | vs full fused step |\n|---|---|---|")
    for k, ts in times.items():
        print(f"| {k} | {median(ts):.3f} | {median(ts) / base:.2f} |")


if __name__ == "__main__":
    main()
