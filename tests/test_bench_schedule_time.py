"""bench/bench_schedule_time.py: the schedule's wall-clock saving is the iteration-weighted step times (by hand)."""
import pytest

from bench.bench_schedule_time import main, report
from megatron_est.config import model_preset
from megatron_est.est.savings import StageFlops


def test_wall_clock_saving_by_hand(capsys):
    stages = [StageFlops(1, 0, 25, 1000, 2500), StageFlops(2, 25, 25, 1500, 2500), StageFlops(3, 50, 50, 5000, 5000)]
    out = report(stages, {"full": 2.0, "stage1": 0.5, "stage2": 1.0}, 100, "spec", model_preset("gpt2-tiny"), 8)
    # time: 25 x 0.5 + 25 x 1.0 + 50 x 2.0 = 137.5 of 200
    assert out["time_saving"] == pytest.approx(1 - 137.5 / 200) and out["flops_saving"] == pytest.approx(0.25)
    assert "wall-clock saving 31.2%" in capsys.readouterr().out


def test_runs_a_real_schedule(capsys):
    out = main(["--reps", "1", "--", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
                "--seq-length", "16", "--micro-batch-size", "2", "--vocab-size", "128", "--train-iters", "10",
                "--num-threads", "1", "--est-schedule", "0:0.5,0.5,0.5;5:1,1,1"])
    assert 0 < out["flops_saving"] < 0.5 and "| 1 | 5 |" in capsys.readouterr().out


def test_fresh_processes_report_medians(capsys):
    out = main(["--reps", "1", "--processes", "2", "--", "--num-layers", "2", "--hidden-size", "32",
                "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2", "--vocab-size", "128",
                "--train-iters", "10", "--num-threads", "1", "--est-schedule", "0:0.5,0.5,0.5;5:1,1,1"])
    printed = capsys.readouterr().out
    assert "# median over 2 processes" in printed and "| 1 | 0.350 |" in printed
    assert 0 < out["flops_saving"] < 0.5
