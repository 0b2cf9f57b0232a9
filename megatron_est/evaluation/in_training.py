"""--eval-tasks during training: the zero-shot tasks on the first --eval-limit documents of each, on the full
model at every evaluation, under the run's autocast; logged beside val_loss (metrics file, TensorBoard)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from typing import Callable, Optional

from megatron_est.config import Config, ConfigError
from megatron_est.evaluation.tasks import parse_tasks
from megatron_est.parallel.state import ParallelState


def downstream_evaluator(cfg: Config, st: ParallelState, tokenizer, precision=None) -> Optional[Callable]:
    """None without --eval-tasks; else model -> {task: {"acc": ..., ...}}. Every rank runs it (a TP group
    scores together; DP ranks repeat the same work), rank 0 logs it."""
    tr = cfg.train
    if not tr.eval_tasks:
        return None
    names = parse_tasks(tr.eval_tasks, "--eval-tasks")
    if tr.eval_limit < 1:
        raise ConfigError("--eval-limit must be >= 1")
    if st.pp > 1:
        raise ConfigError("--eval-tasks is not supported with --pipeline-model-parallel-size > 1 (no stage holds "
                          "the whole model): evaluate the checkpoints with tools/evaluate.py")
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--eval-tasks needs lm-eval (pip install 'lm-eval[hf]')")
    from megatron_est.evaluation.harness import result_rows, run_tasks
    from megatron_est.evaluation.lm import MegatronLM

    autocast = precision.autocast if precision is not None else None  # the engine's (training/engine.py)

    def run(model) -> dict:
        lm = MegatronLM(model, tokenizer, batch_size=tr.micro_batch_size, autocast=autocast, show_progress=False)
        with _quiet(tr.verbose):
            rows = result_rows(run_tasks(lm, names, tr.eval_limit, verbosity="ERROR"))
        return {r["task"]: {k: r[k] for k in ("acc", "acc_norm", "perplexity") if k in r} for r in rows}

    return run


@contextlib.contextmanager
def _quiet(verbose: bool):
    """lm-eval prints on every rank at every evaluation: progress bars (datasets', its own) and git's "fatal:
    not a git repository" when it records the commit outside a checkout. Unless --verbose, the stderr file
    descriptor (which tqdm writes to and git's child process inherits) points at /dev/null for the evaluation;
    an exception still reaches the caller, which reports it after."""
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
