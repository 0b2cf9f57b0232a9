#!/usr/bin/env python
"""Compare reproduce.py studies that differ only in training length: how EST's gap to the baseline and to the
compute-matched control changes with tokens per parameter.

    python tools/study_series.py --out docs/repro/series-h64 --params 268800 \
        docs/repro/study-h64-iters1200 docs/repro/study-h64 docs/repro/study-h64-iters4800

Reads each study's results.json and metrics files; writes OUT/series.md (table) and OUT/series.png (final
validation loss against training tokens per method, and the baselines' validation curves). With --predict-at T
it also fits EST's gap to the control against tokens per parameter (megatron_est/study/predict.py: log-linear
and power law, 95% intervals) and predicts the gap at each T, and where the log-linear fit reaches zero.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

from megatron_est.study.predict import fit_gaps  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _tokens_and_curve(metrics: str) -> tuple[int, list[tuple[int, float]]]:
    with open(metrics) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    per_step = next(r["tokens"] // r["iteration"] for r in recs if "tokens" in r)
    curve = [(r["iteration"] * per_step, r["val_loss"]) for r in recs if "val_loss" in r]
    return curve[-1][0], curve


def study_row(folder: str, seeds: set[int]) -> dict:
    """Final validation loss of baseline, EST and EST's matched control, mean over `seeds`."""
    with open(os.path.join(folder, "results.json")) as f:
        res = json.load(f)
    kinds = {"baseline": "baseline", "est": "est", "control": res["matched"]["est"]}
    tokens, curve = _tokens_and_curve(os.path.join(folder, "baseline-s0.jsonl"))
    row = {"folder": folder, "tokens": tokens, "curve": curve}
    for m, k in kinds.items():
        losses = [r["final_val_loss"] for r in res["runs"] if r["method"] == k and r["seed"] in seeds]
        row[m] = sum(losses) / len(losses)
        train = [_final_train_loss(os.path.join(folder, f"{k}-s{s}.jsonl")) for s in sorted(seeds)]
        row[f"{m}_train"] = sum(train) / len(train) if None not in train else None
    return row


def _final_train_loss(metrics: str):
    """The last train line's loss (the mean over its log interval); None without a metrics file."""
    if not os.path.exists(metrics):
        return None
    with open(metrics) as f:
        return [json.loads(line) for line in f if '"lm_loss"' in line][-1]["lm_loss"]


def _train_lines(rows: list[dict]) -> list[str]:
    """Final train loss beside the validation loss: the validation-minus-train gap grows with repetition."""
    def cell(v):
        return f"{v:.4f}" if v is not None else "-"

    def diff(a, b):
        return f"{a - b:+.4f}" if a is not None and b is not None else "-"

    lines = ["| study | baseline | EST | control | EST - control | baseline val - train | EST val - train |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        b, e, c = r["baseline_train"], r["est_train"], r["control_train"]
        lines.append(f"| {r['folder']} | {cell(b)} | {cell(e)} | {cell(c)} | {diff(e, c)} | "
                     f"{diff(r['baseline'], b)} | {diff(r['est'], e)} |")
    return lines


def _prediction_lines(rows: list[dict], params: int, targets: list[float]) -> list[str]:
    """The gap to the control fitted against tokens per parameter, and what the fits say at each target."""
    fits = fit_gaps([r["tokens"] / params for r in rows], [r["est"] - r["control"] for r in rows])
    lin, pw = fits.log_linear, fits.power
    point, lo, hi = fits.crossing()
    lines = [f"EST - control fitted over the {len(rows)} lengths above (least squares, 95% intervals for a new run):",
             "", f"- log-linear: gap = {lin.c0:.4f} {lin.c1:+.4f} ln T (residual sd {lin.s2 ** 0.5:.4f}); zero at "
             f"T = {point:.0f} tokens per parameter (95%: {lo:.0f} to {hi:.0f})",
             f"- power law: gap = {math.exp(pw.c0):.4f} T^{pw.c1:.4f} (residual sd of ln gap {pw.s2 ** 0.5:.4f}); "
             "never zero", "", "| tokens/param | log-linear gap (95%) | power-law gap (95%) |", "|---|---|---|"]
    for t in targets:
        p = fits.predict(t)
        lines.append(f"| {t:g} | " + " | ".join(f"{v:+.3f} ({a:+.3f} to {b:+.3f})" for v, a, b in
                                                (p["log_linear"], p["power"])) + " |")
    return lines


def _seeds(folder: str) -> set[int]:
    with open(os.path.join(folder, "results.json")) as f:
        runs = json.load(f)["runs"]
    return {r["seed"] for r in runs if r["method"] == "est"}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="+", help="reproduce.py output folders, same model and schedule")
    ap.add_argument("--out", required=True)
    ap.add_argument("--params", type=int, required=True, help="model parameters, for tokens per parameter")
    ap.add_argument("--predict-at", type=float, nargs="+", default=[], metavar="T",
                    help="fit EST - control against tokens per parameter and predict it at these T")
    args = ap.parse_args(argv)
    seeds = set.intersection(*(_seeds(d) for d in args.studies))  # compare like with like
    if not seeds:
        ap.error("the studies have no EST seed in common")
    rows = sorted((study_row(d, seeds) for d in args.studies), key=lambda r: r["tokens"])
    os.makedirs(args.out, exist_ok=True)
    lines = ["| study | training tokens | tokens/param | baseline | EST | control | EST - baseline | "
             "EST - control | control - baseline |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['folder']} | {r['tokens']:.3g} | {r['tokens'] / args.params:.0f} | "
                     f"{r['baseline']:.4f} | {r['est']:.4f} | {r['control']:.4f} | {r['est'] - r['baseline']:+.4f} | "
                     f"{r['est'] - r['control']:+.4f} | {r['control'] - r['baseline']:+.4f} |")
    train = _train_lines(rows)
    fit = _prediction_lines(rows, args.params, args.predict_at) if args.predict_at else []
    with open(os.path.join(args.out, "series.md"), "w") as f:
        f.write(f"Final validation loss by training length (seeds {sorted(seeds)}, the ones all studies have).\n\n"
                + "\n".join(lines) + "\n\nFinal train loss (the last log interval's mean), same runs:\n\n"
                + "\n".join(train) + "\n" + ("\n" + "\n".join(fit) + "\n" if fit else ""))
    _plot(rows, args.params, os.path.join(args.out, "series.png"))
    print("\n".join(lines + [""] + train + [""] + fit))
    return rows


def _plot(rows: list[dict], params: int, path: str) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [r["tokens"] / params for r in rows]
    for m, c in (("baseline", "tab:blue"), ("est", "tab:red"), ("control", "tab:green")):
        a.plot(xs, [r[m] for r in rows], marker="o", color=c, label=m)
    a.set_xscale("log")
    a.set_xlabel("training tokens per parameter (baseline)")
    a.set_ylabel("final validation loss")
    a.set_title("final loss by training length")
    for r in rows:
        b.plot([t / params for t, _ in r["curve"]], [v for _, v in r["curve"]], label=f"{r['tokens']:.2g} tokens")
    b.set_xscale("log")
    b.set_xlabel("tokens per parameter so far")
    b.set_ylabel("validation loss (baseline, seed 0)")
    b.set_title("baseline curves")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
