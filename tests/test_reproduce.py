"""A miniature of the reproduction study keeps the tool working: three methods, table, plots, resumability."""
import json
import os

import pytest

from megatron_est.study.report import RunResult, flops_to_reach, paired_table, summary_table
from tools.reproduce import main

TRAIN = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "2", "--train-iters", "10", "--log-interval", "1", "--eval-interval", "5",
         "--eval-iters", "1", "--lr-warmup-iters", "1", "--est-schedule", "0:0.5,0.5,0.5;3:0.5,0.5,1;6:1,1,1",
         "--num-threads", "1"]


def test_miniature_study(tmp_path):
    out = str(tmp_path / "study")
    summary = main(["--out", out, "--seeds", "0", "--", *TRAIN, "--data-cache-dir", str(tmp_path / "cache")])
    control = json.load(open(os.path.join(out, "results.json")))["matched"]["est"]
    assert set(summary) == {"baseline", "est", control}
    assert 6 <= int(control.split("-i")[1]) < 10  # EST saves FLOPs in its first 6 iterations only
    assert 0 < summary["est"]["flops_saving"] < 0.5
    assert summary[control]["flops"] == pytest.approx(summary["est"]["flops"], rel=0.15)
    for f in ("results.md", "results.json", "loss_vs_flops.png", "loss_vs_time.png", "est-s0.jsonl"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    mtime = os.path.getmtime(os.path.join(out, "est-s0.jsonl"))
    main(["--out", out, "--seeds", "0", "--", *TRAIN, "--data-cache-dir", str(tmp_path / "cache")])
    assert os.path.getmtime(os.path.join(out, "est-s0.jsonl")) == mtime  # finished runs are not redone
    assert json.load(open(os.path.join(out, "results.json")))["command"].startswith("python tools/reproduce.py")


def test_flops_to_reach_and_table_by_hand():
    base = RunResult("baseline", 0, 2.0, 100, 10.0, [(50, 5.0, 3.0), (100, 10.0, 2.0)])
    est = RunResult("est", 0, 1.9, 80, 9.0, [(40, 4.0, 2.5), (80, 9.0, 1.9)])
    assert flops_to_reach(est, 2.0) == 80 and flops_to_reach(est, 1.0) is None
    _, s = summary_table([base, est])
    assert s["est"]["flops_saving"] == pytest.approx(0.2) and s["est"]["time_saving"] == pytest.approx(0.1)
