"""Summaries of the study's metrics files: final losses, FLOPs, wall-clock, FLOPs to reach the baseline."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Optional


@dataclass
class RunResult:
    method: str
    seed: int
    final_val_loss: float
    flops: int  # cumulative training FLOPs
    train_time_s: float  # training steps only (no evaluation, no set-up)
    val_curve: list[tuple[int, float, float]]  # (cumulative FLOPs, training seconds so far, val loss)


def load_run(path: str, method: str, seed: int) -> RunResult:
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    t, last_it, curve, flops = 0.0, 0, [], 0
    for r in recs:
        if "lm_loss" in r:
            t += r["interval_time_s"] * (r["iteration"] - last_it)
            last_it, flops = r["iteration"], r["cumulative_flops"]
        if "val_loss" in r:
            curve.append((r["cumulative_flops"], t, r["val_loss"]))
    if not curve:
        raise ValueError(f"{path}: no validation loss recorded")
    return RunResult(method, seed, curve[-1][2], flops, t, curve)


def flops_to_reach(run: RunResult, target: float) -> Optional[int]:
    """Cumulative FLOPs at the first evaluation whose loss is <= target (None if never)."""
    return next((f for f, _, loss in run.val_curve if loss <= target), None)


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summary_table(results: list[RunResult]) -> tuple[str, dict]:
    by = {m: [r for r in results if r.method == m] for m in dict.fromkeys(r.method for r in results)}
    base = by.get("baseline")
    target = statistics.mean(r.final_val_loss for r in base) if base else None
    base_flops = statistics.mean(r.flops for r in base) if base else None
    base_time = statistics.mean(r.train_time_s for r in base) if base else None
    lines = ["| method | seeds | final val loss (mean ± sd) | training FLOPs | FLOPs saving | wall-clock saving |"
             " FLOPs to reach baseline's final val loss |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for m, runs in by.items():
        loss, sd = _mean_sd([r.final_val_loss for r in runs])
        flops = statistics.mean(r.flops for r in runs)
        tsec = statistics.mean(r.train_time_s for r in runs)
        reach = [flops_to_reach(r, target) for r in runs] if target is not None else []
        reached = [x for x in reach if x is not None]
        summary[m] = {"final_val_loss_mean": loss, "final_val_loss_sd": sd, "flops": flops, "train_time_s": tsec,
                      "flops_saving": 1 - flops / base_flops if base_flops else None,
                      "time_saving": 1 - tsec / base_time if base_time else None,
                      "reached_baseline": f"{len(reached)}/{len(runs)}",
                      "flops_to_reach_mean": statistics.mean(reached) if reached else None}
        s = summary[m]
        reach_txt = f"{s['flops_to_reach_mean']:.3e} ({s['reached_baseline']} seeds)" if reached else \
            f"not reached ({s['reached_baseline']})"
        lines.append(f"| {m} | {len(runs)} | {loss:.4f} ± {sd:.4f} | {flops:.3e} | "
                     f"{100 * (s['flops_saving'] or 0):.1f}% | {100 * (s['time_saving'] or 0):.1f}% | {reach_txt} |")
    return "\n".join(lines), summary
