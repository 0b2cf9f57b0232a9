"""The non-finite guard: a step whose loss or gradient norm is inf/nan changes no parameter and no optimizer state,
is counted in the records, and --max-nonfinite-steps of them in a row stop the run with one line, leaving the
last checkpoint (finite weights) to resume from.

NaN is injected for real: a forward hook multiplies the model's loss by nan on the micro-batches of chosen
iterations, so the backward produces nan gradients exactly as an overflow or a bad batch would. Without the guard
the optimizer would step on them (the first test checks the gradients of that step were indeed nan).
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_est.data.default_corpus import prepare_default_corpus
from megatron_est.parallel.state import ParallelState
from megatron_est.training.loop import NonFiniteError
from tests.engine_harness import make_cfg, parallel_state, run_deepspeed, run_plain, with_checkpoint
from tests.helpers import ROOT, run_distributed

ITERS, MICRO = 8, 4  # make_cfg: global batch 8, micro-batch 2


def _poison(bad_iterations: set, seen: dict, micro: int = MICRO):
    """hooks() for the harness: nan loss on every micro-batch of `bad_iterations` (0-based; `micro` forward
    calls per step on a rank); records, after each iteration, the weights and the optimizer's state, and whether
    a gradient of it was nan."""
    def hooks(model, batches, ckpt):
        calls = {"n": 0}

        def forward_hook(module, args, out):
            step = calls["n"] // micro
            calls["n"] += 1
            return out * float("nan") if step in bad_iterations else out

        model.register_forward_hook(forward_hook)
        after = ckpt.after_step

        def snapshot(state):
            module = getattr(model, "module", model)
            seen[state.iteration] = {
                "weights": {n: p.detach().clone() for n, p in module.named_parameters()},
                "nan_grad": any(p.grad is not None and not torch.isfinite(p.grad).all() for p in module.parameters()),
                "optimizer": _optimizer_state(ckpt.engine)}
            return after(state)

        ckpt.after_step = snapshot
    return hooks


def _optimizer_state(engine) -> list:
    opt = getattr(engine, "optimizer", None)
    if opt is None or not hasattr(opt, "state"):
        return []
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in opt.state.values()]


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


def test_a_nonfinite_step_changes_nothing_and_is_counted():
    seen: dict = {}
    res = run_plain(make_cfg(iters=ITERS), ParallelState(), hooks=_poison({3}, seen))
    assert seen[4]["nan_grad"], "the injected step must have produced nan gradients (else it tests nothing)"
    assert _equal(seen[3]["weights"], seen[4]["weights"]), "the skipped step moved a parameter"
    for before, after in zip(seen[3]["optimizer"], seen[4]["optimizer"]):
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) if torch.is_tensor(before[k]) else before[k] == after[k]
                   for k in before), "the skipped step changed the optimizer state"
    assert not _equal(seen[4]["weights"], seen[5]["weights"]), "training goes on after the skipped step"
    recs = {r["iteration"]: r for r in res["records"]}
    assert math.isnan(recs[4]["lm_loss"]) and recs[4]["nonfinite_steps"] == 1  # the step's own line
    assert recs[3]["nonfinite_steps"] == 0 and recs[ITERS]["nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in res["model"].values())


def test_max_nonfinite_steps_in_a_row_stop_with_a_clean_checkpoint_behind(tmp_path):
    save = str(tmp_path / "ck")
    cfg = make_cfg(iters=ITERS, checkpoint={"save": save, "save_interval": 1})
    cfg.train.max_nonfinite_steps = 3
    seen: dict = {}
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(iterations 3-5\)"):
        run_plain(cfg, ParallelState(), hooks=_poison({2, 3, 4}, seen))
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "4"  # not 5: none after the stop
    assert _equal(seen[2]["weights"], seen[4]["weights"])  # the checkpoints of the streak hold iteration 2's weights
    resumed = run_plain(with_checkpoint(cfg, save=save, load=save), ParallelState())
    assert resumed["start"] == 4 and resumed["end"] == ITERS
    assert all(math.isfinite(v) for v in resumed["losses"].values())


def _zero3_worker(rank, world):
    cfg = make_cfg(iters=6, engine={"deepspeed": True, "zero_stage": 3})
    seen: dict = {}
    res = run_deepspeed(cfg, parallel_state(rank, world, cfg), hooks=_poison({2}, seen, micro=MICRO // world))
    return {"seen": {k: v["weights"] for k, v in seen.items()}, "records": res["records"]}


@pytest.mark.slow
def test_deepspeed_zero3_skips_a_nonfinite_step():
    """ZeRO-3 at DP 2: DeepSpeed discards a step with a nan gradient norm; our records count it."""
    pytest.importorskip("deepspeed")
    out = run_distributed(_zero3_worker, 2)[0]
    recs = {r["iteration"]: r for r in out["records"]}
    assert math.isnan(recs[3]["lm_loss"]) and recs[3]["nonfinite_steps"] == 1
    assert recs[2]["nonfinite_steps"] == 0 and recs[6]["nonfinite_steps"] == 1
    assert all(math.isfinite(recs[i]["lm_loss"]) for i in (4, 5, 6))  # DeepSpeed discarded the nan update


def test_lr_1e6_stops_with_one_line_and_exit_1(tmp_path):
    """The issue's reproduction: --lr 1e6 used to train nan for every step and exit 0."""
    cache = str(tmp_path / "cache")
    prepare_default_corpus(cache)
    argv = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "40",
            "--log-interval", "5", "--eval-iters", "1", "--num-threads", "1", "--lr", "1e6", "--min-lr", "0",
            "--max-nonfinite-steps", "3", "--data-cache-dir", cache, "--save", str(tmp_path / "ck"),
            "--save-interval", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "steps in a row" in last and "--max-nonfinite-steps 3" in last and "Traceback" not in proc.stderr, last
    assert "number of nan iterations" in proc.stdout
