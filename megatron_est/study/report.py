"""Summaries of the study's metrics files: final losses, FLOPs, wall-clock, FLOPs to reach the baseline, and
each EST method against its compute-matched control, seed by seed."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RunResult:
    method: str
    seed: int
    final_val_loss: float
    flops: int  # cumulative training FLOPs
    train_time_s: float  # training steps only (no evaluation, no set-up)
    val_curve: list[tuple[int, float, float]]  # (cumulative FLOPs, training seconds so far, val loss)
    final_extra: dict[str, float] = field(default_factory=dict)  # held-out sets (--extra-valid-data-path)
    # Last logged iteration before each change of EST stage (exact when --log-interval divides the switch).
    stage_starts: list[int] = field(default_factory=list)
    val_iterations: list[int] = field(default_factory=list)  # iteration of each val_curve point
    final_downstream: dict[str, float] = field(default_factory=dict)  # task -> accuracy (--eval-tasks)
    # The last train line's loss (its mean over the last log interval): against the validation loss it tells
    # fitting the data apart from generalising on repeated data.
    final_train_loss: Optional[float] = None


def load_run(path: str, method: str, seed: int) -> RunResult:
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    t, last_it, curve, flops, extra, stages, last_stage, iters = 0.0, 0, [], 0, {}, [], None, []
    train_loss = None
    downstream: dict = {}
    for r in recs:
        if "lm_loss" in r:
            t += r["interval_time_s"] * (r["iteration"] - last_it)
            if r.get("est_stage") != last_stage and last_stage is not None:
                stages.append(last_it)
            last_stage = r.get("est_stage")
            last_it, flops, train_loss = r["iteration"], r["cumulative_flops"], r["lm_loss"]
        if "val_loss" in r:
            curve.append((r["cumulative_flops"], t, r["val_loss"]))
            iters.append(r["iteration"])
            extra = r.get("extra_val_loss", {})
            downstream = {task: row["acc"] for task, row in r.get("downstream", {}).items()}
    if not curve:
        raise ValueError(f"{path}: no validation loss recorded")
    return RunResult(method, seed, curve[-1][2], flops, t, curve, extra, stages, iters, downstream, train_loss)


def flops_to_reach(run: RunResult, target: float) -> Optional[int]:
    """Cumulative FLOPs at the first evaluation whose loss is <= target (None if never)."""
    return next((f for f, _, loss in run.val_curve if loss <= target), None)


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _by_method(results: list[RunResult]) -> dict[str, list[RunResult]]:
    return {m: [r for r in results if r.method == m] for m in dict.fromkeys(r.method for r in results)}


def summary_table(results: list[RunResult]) -> tuple[str, dict]:
    """One row per method: losses (mean ± sd over seeds), FLOPs and wall-clock against the baseline."""
    by = _by_method(results)
    base = by.get("baseline")
    target = statistics.mean(r.final_val_loss for r in base) if base else None
    base_flops = statistics.mean(r.flops for r in base) if base else None
    base_time = statistics.mean(r.train_time_s for r in base) if base else None
    extra_names = list(dict.fromkeys(n for r in results for n in r.final_extra))
    lines = ["| method | seeds | final val loss (mean ± sd) | final train loss (last log interval) | "
             + "".join(f"held-out {n} loss | " for n in extra_names)
             + "training FLOPs | FLOPs saving | wall-clock saving | FLOPs to reach baseline's final val loss |",
             "|---|---|---|---|" + "---|" * len(extra_names) + "---|---|---|---|"]
    summary = {}
    for m, runs in by.items():
        loss, sd = _mean_sd([r.final_val_loss for r in runs])
        train = [r.final_train_loss for r in runs if r.final_train_loss is not None]
        train_txt = "{:.4f} ± {:.4f}".format(*_mean_sd(train)) if train else "-"
        extra = {n: _mean_sd([r.final_extra[n] for r in runs if n in r.final_extra]) for n in extra_names
                 if any(n in r.final_extra for r in runs)}
        flops = statistics.mean(r.flops for r in runs)
        tsec = statistics.mean(r.train_time_s for r in runs)
        reach = [flops_to_reach(r, target) for r in runs] if target is not None else []
        reached = [x for x in reach if x is not None]
        summary[m] = {"final_val_loss_mean": loss, "final_val_loss_sd": sd, "flops": flops, "train_time_s": tsec,
                      "final_train_loss_mean": statistics.mean(train) if train else None,
                      "extra_val_loss": {n: {"mean": e[0], "sd": e[1]} for n, e in extra.items()},
                      "flops_saving": 1 - flops / base_flops if base_flops else None,
                      "time_saving": 1 - tsec / base_time if base_time else None,
                      "reached_baseline": f"{len(reached)}/{len(runs)}",
                      "flops_to_reach_mean": statistics.mean(reached) if reached else None}
        s = summary[m]
        reach_txt = f"{s['flops_to_reach_mean']:.3e} ({s['reached_baseline']} seeds)" if reached else \
            f"not reached ({s['reached_baseline']})"
        extra_txt = "".join(f"{extra[n][0]:.4f} ± {extra[n][1]:.4f} | " if n in extra else "- | "
                            for n in extra_names)
        lines.append(f"| {m} | {len(runs)} | {loss:.4f} ± {sd:.4f} | {train_txt} | {extra_txt}{flops:.3e} | "
                     f"{100 * (s['flops_saving'] or 0):.1f}% | {100 * (s['time_saving'] or 0):.1f}% | {reach_txt} |")
    return "\n".join(lines), summary


def downstream_table(results: list[RunResult]) -> tuple[str, dict]:
    """Zero-shot accuracy at the last evaluation (training with --eval-tasks), one row per method and one
    column per task (mean ± sd over seeds); ("", {}) when no run logged any."""
    tasks = list(dict.fromkeys(t for r in results for t in r.final_downstream))
    if not tasks:
        return "", {}
    lines = ["| method | seeds | " + " | ".join(f"{t} acc" for t in tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    out = {}
    for m, runs in _by_method(results).items():
        accs = {t: [r.final_downstream[t] for r in runs if t in r.final_downstream] for t in tasks}
        out[m] = {t: dict(zip(("mean", "sd"), _mean_sd(v))) for t, v in accs.items() if v}
        cells = [f"{out[m][t]['mean']:.4f} ± {out[m][t]['sd']:.4f}" if t in out[m] else "-" for t in tasks]
        lines.append(f"| {m} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), out


def paired_table(results: list[RunResult], matched: dict[str, str]) -> tuple[str, dict]:
    """Each EST method against its compute-matched control and the baseline, as per-seed differences
    (mean ± sd over the seeds both have): negative means EST is better."""
    by = _by_method(results)
    ref = {(r.method, r.seed): r for r in results}
    base_flops = statistics.mean(r.flops for r in by["baseline"]) if "baseline" in by else None
    lines = ["| EST method | seeds | FLOPs saving | val loss | vs matched control | vs baseline | "
             "held-out vs control | train loss vs control |", "|---|---|---|---|---|---|---|---|"]
    out = {}
    for m, control in matched.items():
        runs = [r for r in by.get(m, []) if (control, r.seed) in ref]
        if not runs:
            continue
        d_ctl = [r.final_val_loss - ref[(control, r.seed)].final_val_loss for r in runs]
        d_base = [r.final_val_loss - ref[("baseline", r.seed)].final_val_loss for r in runs
                  if ("baseline", r.seed) in ref]
        d_held = [v - ref[(control, r.seed)].final_extra[n] for r in runs for n, v in r.final_extra.items()
                  if n in ref[(control, r.seed)].final_extra]
        d_train = [r.final_train_loss - ref[(control, r.seed)].final_train_loss for r in runs
                   if r.final_train_loss is not None and ref[(control, r.seed)].final_train_loss is not None]
        stats = {k: _mean_sd(v) if v else None
                 for k, v in (("ctl", d_ctl), ("base", d_base), ("held", d_held), ("train_ctl", d_train))}
        saving = 1 - statistics.mean(r.flops for r in runs) / base_flops if base_flops else None
        out[m] = {"control": control, "seeds": len(runs), "flops_saving": saving,
                  "val_loss_mean": statistics.mean(r.final_val_loss for r in runs),
                  **{f"delta_{k}": v for k, v in stats.items()}}
        cell = (lambda v: f"{v[0]:+.4f} ± {v[1]:.4f}" if v else "-")
        lines.append(f"| {m} | {len(runs)} | {100 * (saving or 0):.1f}% | {out[m]['val_loss_mean']:.4f} | "
                     f"{cell(stats['ctl'])} ({control}) | {cell(stats['base'])} | {cell(stats['held'])} | "
                     f"{cell(stats['train_ctl'])} |")
    return "\n".join(lines), out


MAX_SWITCHES = 8  # more stage changes than this: a smooth schedule (a new stage every iteration), no switches


def switch_table(results: list[RunResult], gap: int) -> str:
    """Validation loss around each EST stage switch, against the baseline of the same seed at the same
    iteration: the last evaluation before the switch and `gap` iterations later."""
    base = {r.seed: dict(zip(r.val_iterations, (c[2] for c in r.val_curve))) for r in results
            if r.method == "baseline"}
    lines = ["| EST run | switch after | val loss there (baseline) | val loss +%d (baseline) | change over the %d "
             "iterations (baseline's) |" % (gap, gap), "|---|---|---|---|---|"]
    for r in results:
        if not r.method.startswith("est") or r.seed not in base or len(r.stage_starts) > MAX_SWITCHES:
            continue
        val = dict(zip(r.val_iterations, (c[2] for c in r.val_curve)))
        for s in r.stage_starts:
            at = max((i for i in val if i <= s), default=None)
            if at is None or at + gap not in val or at not in base[r.seed] or at + gap not in base[r.seed]:
                continue
            b0, b1 = base[r.seed][at], base[r.seed][at + gap]
            lines.append(f"| {r.method}-s{r.seed} | {s} | {val[at]:.4f} ({b0:.4f}) | {val[at + gap]:.4f} ({b1:.4f}) | "
                         f"{val[at + gap] - val[at]:+.4f} ({b1 - b0:+.4f}) |")
    return "\n".join(lines)
