#!/usr/bin/env python
"""Baseline vs EST vs compute-matched control, over seeds, with the same data order and batch size.

    python tools/reproduce.py --out docs/repro/tiny --seeds 0 1 2 --jobs 2 \\
        --variant "freeze=--est-unsampled-update freeze" -- \\
        --model-preset gpt2-tiny --train-iters 2000 --est-schedule default --eval-interval 100

Flags after `--` are training flags (pretrain_gpt.py's; --script pretrain_llama.py for Llama). Per seed it trains
(a) the full model ("baseline", --est-schedule none), (b) EST (the given schedule) and (c) the full model for as
many FLOPs as the EST run logged ("control-i<N>": N iterations, its LR schedule ending at its own last step).
Each --variant "NAME=FLAGS" adds an EST run "est-NAME" with FLAGS appended (on --variant-seeds) and its own
compute-matched control; variants of equal FLOPs share one. Finished runs are skipped and an interrupted run
resumes from its last checkpoint (every 5% of its iterations, in OUT/.cache/ckpt/, git-ignored, or
--checkpoint-dir; the unfinished run's metrics file is kept beside it and lands in OUT when the run finishes;
both are deleted then unless --keep-checkpoints), so a study stopped at any moment continues where it was. --jobs runs that many trainings at once (give each --num-threads 1 on a small machine). Writes
OUT/results.md (tables, command), results.json and plots.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_est.study.curves import plot_runs, read_curves  # noqa: E402
from megatron_est.study.plots import plot_curves  # noqa: E402
from megatron_est.study.report import (downstream_table, load_run, paired_table, summary_table,  # noqa: E402
                                       switch_table)
from megatron_est.study.runs import METHODS, Study  # noqa: E402


def _variant(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or not name.replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS with an alphanumeric NAME, got {text!r}")
    return name, flags


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, train_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for metrics, logs, plots and results.md")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS", type=_variant,
                    help="an EST variant: training flags added to the EST run (repeatable)")
    ap.add_argument("--variant-seeds", type=int, nargs="+", help="seeds for the variants (default: the first seed)")
    ap.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing; report the runs finished so far (safe while the study runs)")
    ap.add_argument("--script", default="pretrain_gpt.py", choices=["pretrain_gpt.py", "pretrain_llama.py"])
    ap.add_argument("--checkpoint-dir", help="where unfinished runs keep their checkpoints and metrics (default "
                    "OUT/.cache/ckpt, git-ignored); outside the work tree if that may be re-created before a resume")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each finished run's checkpoints (its final model, for tools/evaluate.py) under the "
                    "checkpoint folder instead of deleting them")
    args = ap.parse_args(ours)
    names = [n for n, _ in args.variant]
    if len(set(names)) != len(names):
        ap.error(f"--variant: names must be distinct, got {names}")
    return args, train_argv


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, train_argv = _parse(argv)
    os.makedirs(args.out, exist_ok=True)
    tasks = [t for s in args.seeds for t in
             ([("baseline", s)] if "baseline" in args.methods else []) + ([("est", s)] if "est" in args.methods
                                                                         else [])]
    tasks += [("est", s, name, tuple(shlex.split(flags))) for name, flags in args.variant
              for s in (args.variant_seeds or args.seeds[:1])]
    study = Study(args.out, args.script, train_argv, with_control="control" in args.methods,
                  report_only=args.report_only, checkpoint_root=args.checkpoint_dir,
                  keep_checkpoints=args.keep_checkpoints)
    study.run_all(tasks, args.jobs)
    results = [load_run(os.path.join(args.out, r.name + ".jsonl"), r.method, r.seed) for r in study.finished]
    table, summary = summary_table(results)
    pairs, paired = paired_table(results, study.matched)
    down, downstream = downstream_table(results)  # training flags with --eval-tasks: zero-shot accuracy
    its = results[0].val_iterations if results else []
    switches = switch_table(results, min((b - a for a, b in zip(its, its[1:])), default=1))
    main_methods = {"baseline", "est", study.matched.get("est")}
    main_runs = [r for r in results if r.method in main_methods]
    plot_curves(main_runs, os.path.join(args.out, "loss_vs_flops.png"), "flops", "validation loss vs training FLOPs")
    plot_curves(main_runs, os.path.join(args.out, "loss_vs_time.png"), "time", "validation loss vs wall-clock")
    first_seed = [r for r in study.finished if r.method in main_methods and r.seed == args.seeds[0]]
    if first_seed:  # train and validation loss against iterations, tokens, FLOPs, wall-clock (tools/plot_run.py)
        plot_runs({r.method: read_curves(os.path.join(args.out, r.name + ".jsonl")) for r in first_seed},
                  os.path.join(args.out, "loss_curves.png"), title=f"seed {args.seeds[0]}")
    if args.variant:
        first = (args.variant_seeds or args.seeds)[0]
        plot_curves([r for r in results if r.seed == first and r.method.startswith(("est", "baseline"))],
                    os.path.join(args.out, "variants_loss_vs_flops.png"), "flops",
                    f"EST variants, seed {first}: validation loss vs training FLOPs")
    command = "python tools/reproduce.py " + shlex.join(a for a in argv if a != "--report-only")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# Study results\n\nCommand:\n\n    {command}\n\n{table}\n\n"
                f"Each EST method against its compute-matched control (per-seed differences of final validation "
                f"loss; negative: EST better):\n\n{pairs}\n\nValidation loss (full model) around each stage switch:\n\n"
                f"{switches}\n\n"
                + (f"Zero-shot accuracy at the last evaluation (--eval-tasks):\n\n{down}\n\n" if down else "")
                + "![loss curves](loss_curves.png)\n"
                "![loss vs FLOPs](loss_vs_flops.png)\n![loss vs wall-clock](loss_vs_time.png)\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": command, "summary": summary, "paired": paired, "downstream": downstream,
                   "matched": study.matched,
                   "errors": study.errors,
                   "runs": [{"method": r.method, "seed": r.seed, "final_val_loss": r.final_val_loss,
                             "final_train_loss": r.final_train_loss,
                             "final_extra_val_loss": r.final_extra, "flops": r.flops,
                             "train_time_s": r.train_time_s, "stage_starts": r.stage_starts,
                             "final_downstream_acc": r.final_downstream} for r in results]},
                  f, indent=1)
    print(table)
    print(pairs)
    if down:
        print(down)
    if study.errors:
        print(f"[study] {len(study.errors)} run(s) failed:\n  " + "\n  ".join(study.errors), file=sys.stderr)
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
