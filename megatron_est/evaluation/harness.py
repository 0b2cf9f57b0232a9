"""Run offline zero-shot tasks through lm-evaluation-harness on any lm_eval LM; results as rows and a table."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile

from megatron_est.evaluation.tasks import CHANCE, write_task_dir


def _offline() -> None:
    """No hub look-ups, ever: the tasks read local files only."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


def run_tasks(lm, names: list[str], limit: int | None = None, log_samples: bool = False,
              verbosity: str = "WARNING") -> dict:
    """lm_eval.simple_evaluate on the offline tasks; returns its results dict. limit: first N documents per
    task (None: all). bootstrap_iters=0: no resampling (result_rows gives closed-form standard errors). The
    global RNGs are left alone (no seeding): a run evaluated mid-training resumes exactly; zero-shot
    log-likelihood tasks use no randomness."""
    _offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(verbosity)
    with tempfile.TemporaryDirectory(prefix="megatron_est_tasks_") as tmp, _each_rank_alone():
        manager = TaskManager(include_path=write_task_dir(names, tmp), include_defaults=False,
                              verbosity=verbosity)
        return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                       bootstrap_iters=0, log_samples=log_samples, verbosity=verbosity,
                                       random_seed=None, numpy_random_seed=None, torch_random_seed=None)


@contextlib.contextmanager
def _each_rank_alone():
    """Our LM scores every request on every rank (its collectives are its own), so to lm-eval each process is
    a whole evaluation. lm-eval 0.4 returns None instead of the results on a process whose LOCAL_RANK is not 0
    (its rule for tensor-parallel launches), which broke --eval-tasks on every other rank of a node."""
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = saved


def result_rows(results: dict) -> list[dict]:
    """One row per task: accuracy (and length-normalised accuracy / perplexity where the task has them),
    its standard error, the number of documents and chance."""
    rows = []
    for name, r in results["results"].items():
        row = {"task": name, "n": results.get("n-samples", {}).get(name, {}).get("effective"),
               "chance": CHANCE.get(name)}
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" in r:
                row[metric] = r[f"{metric},none"]
                row[f"{metric}_stderr"] = _stderr(r.get(f"{metric}_stderr,none"), row[metric], row["n"], metric)
        rows.append(row)
    return rows


def _stderr(given, value: float, n: int | None, metric: str) -> float | None:
    """lm-eval's standard error; for accuracies without one (bootstrap_iters=0) its closed form, the sample
    standard deviation of the 0/1 scores over sqrt(n): sqrt(p (1 - p) / (n - 1))."""
    if isinstance(given, float):
        return given
    if metric.startswith("acc") and n and n > 1:
        return math.sqrt(value * (1 - value) / (n - 1))
    return None


def format_table(rows: list[dict]) -> str:
    """A markdown table of result_rows."""
    def cell(row, key):
        v, se = row.get(key), row.get(f"{key}_stderr")
        if v is None:
            return "-"
        return f"{v:.4f} ± {se:.4f}" if se is not None else f"{v:.4f}"

    lines = ["| task | n | acc | acc_norm | perplexity | chance |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['n']} | {cell(r, 'acc')} | {cell(r, 'acc_norm')} | {cell(r, 'perplexity')} | "
              f"{r['chance'] if r['chance'] is not None else '-'} |" for r in rows]
    return "\n".join(lines)
