#!/usr/bin/env python
"""Baseline vs EST vs compute-matched control, over seeds, with the same data order and batch size.

    python tools/reproduce.py --out docs/repro/tiny --seeds 0 1 2 -- \
        --model-preset gpt2-tiny --train-iters 2000 --est-schedule default --eval-interval 100

Flags after `--` are training flags (pretrain_gpt.py's; --script pretrain_llama.py for Llama). Per seed it trains
(a) the full model ("baseline", --est-schedule none), (b) EST (the given schedule) and (c) the full model for as
many FLOPs as EST uses ("control": fewer iterations, its LR schedule ending at its own last step). Finished runs
are skipped, so an interrupted study resumes. Writes OUT/results.md (table, command), results.json and two plots.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_est.study.plots import plot_curves  # noqa: E402
from megatron_est.study.report import load_run, summary_table  # noqa: E402
from megatron_est.study.runs import METHODS, launch, plan_runs  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for metrics, logs, plots and results.md")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--script", default="pretrain_gpt.py", choices=["pretrain_gpt.py", "pretrain_llama.py"])
    args = ap.parse_args(ours)
    os.makedirs(args.out, exist_ok=True)
    runs = plan_runs(train_argv, args.seeds, args.methods)
    for i, run in enumerate(runs, 1):
        print(f"[study] run {i}/{len(runs)}: {run.name}", flush=True)
        launch(run, args.out, args.script)
    results = [load_run(os.path.join(args.out, r.name + ".jsonl"), r.method, r.seed) for r in runs]
    table, summary = summary_table(results)
    plot_curves(results, os.path.join(args.out, "loss_vs_flops.png"), "flops", "validation loss vs training FLOPs")
    plot_curves(results, os.path.join(args.out, "loss_vs_time.png"), "time", "validation loss vs wall-clock")
    command = "python tools/reproduce.py " + shlex.join(argv)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# Study results\n\nCommand:\n\n    {command}\n\n{table}\n\n"
                "![loss vs FLOPs](loss_vs_flops.png)\n![loss vs wall-clock](loss_vs_time.png)\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": command, "summary": summary,
                   "runs": [{"method": r.method, "seed": r.seed, "final_val_loss": r.final_val_loss,
                             "flops": r.flops, "train_time_s": r.train_time_s} for r in results]}, f, indent=1)
    print(table)
    return summary


if __name__ == "__main__":
    main()
