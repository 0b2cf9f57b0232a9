"""The loss's own cost: torch's F.cross_entropy against ours (parallel/cross_entropy.py, one rank), forward and
backward over [tokens, vocabulary] logits, interleaved round by round. It is a fixed cost of every step that EST
does not shrink (the LM head and the loss are never sampled).

    OMP_NUM_THREADS=1 python bench/bench_cross_entropy.py --tokens 1024 --vocab 50304 8192
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import median  # noqa: E402
from megatron_est.host_memory import keep_freed_memory  # noqa: E402
from megatron_est.parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--vocab", type=int, nargs="+", default=[50304, 8192])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# host memory: {keep_freed_memory(True, 'cpu')}; {args.tokens} tokens, {args.threads} thread(s), "
          f"{args.reps} rounds")
    print("| vocabulary | torch F.cross_entropy ms | ours ms | ours / torch |")
    print("|---|---|---|---|")
    for vocab in args.vocab:
        logits = torch.randn(args.tokens, vocab, requires_grad=True)
        target = torch.randint(0, vocab, (args.tokens,))
        variants = {"torch": lambda: F.cross_entropy(logits, target, reduction="none"),
                    "ours": lambda: vocab_parallel_cross_entropy(logits, target, None, 1, 0)}
        times = {k: [] for k in variants}
        for rnd in range(args.reps + 1):  # round 0 warms up
            for name, fn in variants.items():
                t0 = time.process_time()
                torch.autograd.grad(fn().sum(), logits)
                if rnd:
                    times[name].append(time.process_time() - t0)
        a, b = median(times["torch"]), median(times["ours"])
        print(f"| {vocab} | {1e3 * a:.1f} | {1e3 * b:.1f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
