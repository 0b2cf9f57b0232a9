"""A miniature of the reproduction study keeps the tool working: three methods, table, plots, resumability."""
import json
import os
import shutil

import pytest

from megatron_est.arguments import parse_args
from megatron_est.config import ConfigError
from megatron_est.study.report import RunResult, flops_to_reach, paired_table, summary_table, switch_table
from megatron_est.study.runs import baseline_run, control_run, est_run
from megatron_est.validation import validate
from tools.reproduce import main

TRAIN = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "2", "--train-iters", "10", "--log-interval", "1", "--eval-interval", "5",
         "--eval-iters", "1", "--lr-warmup-iters", "1", "--est-schedule", "0:0.5,0.5,0.5;3:0.5,0.5,1;6:1,1,1",
         "--num-threads", "1"]


def test_miniature_study(tmp_path):
    out = str(tmp_path / "study")
    variants = ["--variant", "freeze=--est-unsampled-update freeze", "--variant", "short=--est-schedule 0:0.5,0.5,1;1:1,1,1"]
    summary = main(["--out", out, "--seeds", "0", *variants, "--jobs", "2", "--",
                    *TRAIN, "--data-cache-dir", str(tmp_path / "cache")])
    results = json.load(open(os.path.join(out, "results.json")))
    control = results["matched"]["est"]
    assert results["matched"]["est-freeze"] == control  # equal FLOPs: one shared control
    assert results["matched"]["est-short"] != control  # one sampled step only: its own, longer control
    assert set(summary) == {"baseline", "est", control, "est-freeze", "est-short", results["matched"]["est-short"]}
    assert set(results["paired"]) == {"est", "est-freeze", "est-short"}
    assert 6 <= int(control.split("-i")[1]) < 10  # EST saves FLOPs in its first 6 iterations only
    assert 0 < summary["est"]["flops_saving"] < 0.5
    assert summary[control]["flops"] == pytest.approx(summary["est"]["flops"], rel=0.15)
    for f in ("results.md", "results.json", "loss_vs_flops.png", "loss_vs_time.png", "est-s0.jsonl"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    mtime = os.path.getmtime(os.path.join(out, "est-s0.jsonl"))
    main(["--out", out, "--seeds", "0", *variants, "--", *TRAIN, "--data-cache-dir", str(tmp_path / "cache")])
    assert os.path.getmtime(os.path.join(out, "est-s0.jsonl")) == mtime  # finished runs are not redone
    assert json.load(open(os.path.join(out, "results.json")))["command"].startswith("python tools/reproduce.py")
    more = ["--variant", "rescale=--est-layer-rescale", "--seeds", "0", "1"]
    summary = main(["--out", out, "--report-only", *variants, *more, "--", *TRAIN,
                    "--data-cache-dir", str(tmp_path / "cache")])
    assert "est-rescale" not in summary and not os.path.exists(os.path.join(out, "est-rescale-s0.jsonl"))
    assert not os.path.exists(os.path.join(out, "baseline-s1.jsonl"))  # nothing trained, nothing failed


def test_flops_to_reach_and_table_by_hand():
    base = RunResult("baseline", 0, 2.0, 100, 10.0, [(50, 5.0, 3.0), (100, 10.0, 2.0)], final_train_loss=1.75)
    est = RunResult("est", 0, 1.9, 80, 9.0, [(40, 4.0, 2.5), (80, 9.0, 1.9)])
    assert flops_to_reach(est, 2.0) == 80 and flops_to_reach(est, 1.0) is None
    table, s = summary_table([base, est])
    assert s["est"]["flops_saving"] == pytest.approx(0.2) and s["est"]["time_saving"] == pytest.approx(0.1)
    assert "| baseline | 1 | 2.0000 ± 0.0000 | 1.7500 ± 0.0000 |" in table and "| est | 1 | 1.9000 ± 0.0000 | - |" in table
    assert s["baseline"]["final_train_loss_mean"] == 1.75 and s["est"]["final_train_loss_mean"] is None


def test_load_run_takes_the_last_train_line(tmp_path):
    from megatron_est.study.report import load_run

    path = tmp_path / "m.jsonl"
    recs = [{"iteration": i, "lm_loss": 5.0 - i, "interval_time_s": 0.1, "cumulative_flops": 10 * i}
            for i in (1, 2, 3)] + [{"iteration": 3, "val_loss": 2.5, "cumulative_flops": 30}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = load_run(str(path), "baseline", 0)
    assert run.final_train_loss == 2.0 and run.final_val_loss == 2.5 and run.flops == 30


def test_paired_differences_by_hand():
    def run(method, seed, loss, held):
        return RunResult(method, seed, loss, 80, 1.0, [(80, 1.0, loss)], {"wiki": held}, final_train_loss=loss - 0.5)

    results = [run("baseline", 0, 2.0, 3.0), run("baseline", 1, 2.2, 3.2), run("est", 0, 2.1, 3.0),
               run("est", 1, 2.5, 3.3), run("control-i7", 0, 2.05, 3.1), run("control-i7", 1, 2.25, 3.1)]
    table, out = paired_table(results, {"est": "control-i7"})
    assert out["est"]["delta_ctl"] == pytest.approx((0.15, 0.2 / 2 ** 0.5))  # diffs 0.05 and 0.25
    assert out["est"]["delta_base"][0] == pytest.approx(0.2)
    assert out["est"]["delta_held"][0] == pytest.approx(0.05)  # diffs -0.1 and +0.2
    assert "+0.1500" in table
    assert out["est"]["delta_train_ctl"] == pytest.approx((0.15, 0.2 / 2 ** 0.5))  # train = val - 0.5 here
    _, s = summary_table(results)
    assert s["est"]["extra_val_loss"]["wiki"]["mean"] == pytest.approx(3.15)


def test_switch_table_by_hand():
    base = RunResult("baseline", 0, 2.0, 0, 0.0, [(0, 0.0, 3.0), (0, 0.0, 2.5), (0, 0.0, 2.0)], {}, [], [5, 10, 15])
    est = RunResult("est", 0, 2.2, 0, 0.0, [(0, 0.0, 3.5), (0, 0.0, 2.9), (0, 0.0, 2.2)], {}, [10], [5, 10, 15])
    assert switch_table([base, est], 5).splitlines()[2] == \
        "| est-s0 | 10 | 2.9000 (2.5000) | 2.2000 (2.0000) | -0.7000 (-0.5000) |"
    smooth = RunResult("est-smooth", 0, 2.2, 0, 0.0, est.val_curve, {}, list(range(1, 15)), [5, 10, 15])
    assert len(switch_table([base, smooth], 5).splitlines()) == 2  # a stage per iteration: no switch rows


@pytest.mark.slow  # four short trainings, 5 processes: about 25 s
def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    """A run stopped part-way (here by --exit-interval, as a kill between checkpoints would leave it) is not
    marked done; launching it again resumes at its checkpoint, and the result equals an uninterrupted run's."""
    from megatron_est.study.runs import baseline_run, checkpoint_dir, launch, live_metrics
    from megatron_est.training.checkpoint_layout import read_latest_iteration

    train = [*TRAIN, "--train-iters", "20", "--data-cache-dir", str(tmp_path / "cache")]
    out, ref = str(tmp_path / "study"), str(tmp_path / "ref")
    os.makedirs(out), os.makedirs(ref)
    run = baseline_run(train, 0)
    with pytest.raises(RuntimeError, match="stopped at iteration 10 of 20"):
        launch(baseline_run([*train, "--exit-interval", "10"], 0), out, "pretrain_gpt.py")
    assert not os.path.exists(os.path.join(out, run.name + ".done"))
    assert not os.path.exists(os.path.join(out, run.name + ".jsonl"))  # published only when finished
    assert os.path.isdir(checkpoint_dir(out, run)) and os.path.isfile(live_metrics(checkpoint_dir(out, run)))
    lost = str(tmp_path / "lost")  # the checkpoint survived, its metrics did not
    shutil.copytree(out, lost)
    os.remove(live_metrics(checkpoint_dir(lost, run)))
    launch(run, out, "pretrain_gpt.py")
    launch(run, ref, "pretrain_gpt.py", keep=True)  # --keep-checkpoints
    launch(run, lost, "pretrain_gpt.py")
    assert "loaded checkpoint" in open(os.path.join(out, run.name + ".log")).read()
    assert "loaded checkpoint" not in open(os.path.join(ref, run.name + ".log")).read()
    assert "loaded checkpoint" not in open(os.path.join(lost, run.name + ".log")).read()  # started over
    assert not os.path.exists(checkpoint_dir(out, run))  # a finished run deletes its checkpoints
    assert not os.path.exists(live_metrics(checkpoint_dir(out, run)))
    assert read_latest_iteration(checkpoint_dir(ref, run)) == 20  # kept: the final model, for evaluation

    def losses(folder):
        recs = [json.loads(line) for line in open(os.path.join(folder, run.name + ".jsonl"))]
        return [(r["iteration"], r["lm_loss"]) for r in recs if "lm_loss" in r]

    got, want = losses(out), losses(ref)
    assert [i for i, _ in got] == list(range(1, 21)) and losses(lost) == want
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-6)


def test_checkpoints_fall_on_log_lines():
    """A resumed run's first train line averages the iterations since its checkpoint: with checkpoints at
    multiples of --log-interval that is the same average an uninterrupted run logs."""
    from megatron_est.study.runs import Run, checkpoint_flags

    def interval(argv):
        flags = checkpoint_flags(Run("est", 0, argv), "ck")
        return int(flags[flags.index("--save-interval") + 1])

    assert interval(["--train-iters", "14400", "--log-interval", "50"]) == 700  # 5% is 720
    assert interval(["--train-iters", "10800", "--log-interval", "50"]) == 550  # 540
    assert interval(["--train-iters", "10", "--log-interval", "50"]) == 50
    assert interval(["--train-iters", "14400"]) == 720
    assert "--save-interval" not in checkpoint_flags(Run("est", 0, []), "ck")  # the preset's length: end only


@pytest.mark.parametrize("flag", [["--est-target-saving", "0.25"], ["--est-target-saving=0.25"]])
def test_full_model_runs_drop_est_only_flags(flag):
    """A study with --est-target-saving in its training flags: its EST run fits the schedule, and its baseline and
    control are full-model runs that the trainer accepts (it refuses --est-target-saving with --est-schedule none:
    the redundancy study's control failed that way on 2026-12-01)."""
    argv = TRAIN + flag
    assert "0.25" in " ".join(est_run(argv, 0).argv)
    for run in (baseline_run(argv, 0), control_run(argv, 0, 8)):
        assert not any(a.startswith("--est-target-saving") for a in run.argv) and "0.25" not in run.argv
        validate(parse_args(run.argv, "test", "gpt2-tiny"), 1)
    with pytest.raises(ConfigError, match="--est-target-saving needs an --est-schedule with a sub-full stage"):
        validate(parse_args([*argv, "--est-schedule", "none"], "test", "gpt2-tiny"), 1)  # the old control's flags
