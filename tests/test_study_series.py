"""tools/study_series.py: the table compares studies on the seeds they share (hand-made study folders)."""
import json
import os

import pytest

from tools.study_series import main


def _study(folder, iters, losses):
    """losses: {(method, seed): final val loss}; the baseline's metrics give tokens and its curve."""
    os.makedirs(folder)
    runs = [{"method": m, "seed": s, "final_val_loss": v} for (m, s), v in losses.items()]
    json.dump({"matched": {"est": "control-i9"}, "runs": runs}, open(os.path.join(folder, "results.json"), "w"))
    with open(os.path.join(folder, "baseline-s0.jsonl"), "w") as f:
        f.write(json.dumps({"iteration": iters, "lm_loss": 1.0, "tokens": iters * 100}) + "\n")
        f.write(json.dumps({"iteration": iters, "val_loss": losses[("baseline", 0)]}) + "\n")
    for (m, s), v in losses.items():  # train loss 0.25 below validation, except the baseline's 1.0
        if (m, s) != ("baseline", 0):
            with open(os.path.join(folder, f"{m}-s{s}.jsonl"), "w") as f:
                f.write(json.dumps({"iteration": iters - 1, "lm_loss": 99.0}) + "\n")
                f.write(json.dumps({"iteration": iters, "lm_loss": v - 0.25, "tokens": iters * 100}) + "\n")


def test_series_on_shared_seeds(tmp_path):
    short, long = str(tmp_path / "short"), str(tmp_path / "long")
    _study(long, 20, {("baseline", 0): 2.0, ("est", 0): 2.1, ("control-i9", 0): 2.05})
    _study(short, 10, {("baseline", 0): 3.0, ("est", 0): 3.4, ("control-i9", 0): 3.1,
                       ("baseline", 1): 9.0, ("est", 1): 9.0, ("control-i9", 1): 9.0})  # seed 1: not shared
    rows = main(["--out", str(tmp_path / "out"), "--params", "100", long, short])
    assert [r["tokens"] for r in rows] == [1000, 2000]
    assert rows[0]["est"] - rows[0]["control"] == pytest.approx(0.3)  # seed 0 only
    assert rows[1]["est"] - rows[1]["baseline"] == pytest.approx(0.1)
    assert os.path.getsize(tmp_path / "out" / "series.png") > 0
    assert "| 10 |" in open(tmp_path / "out" / "series.md").read()  # 1000 tokens / 100 parameters
    assert rows[0]["est_train"] == pytest.approx(3.15) and rows[0]["baseline_train"] == 1.0  # the last line
    assert f"| {short} | 1.0000 | 3.1500 | 2.8500 | +0.3000 | +2.0000 | +0.2500 |" in \
        open(tmp_path / "out" / "series.md").read()


def test_predict_at_fits_the_gap_to_the_control(tmp_path):
    """Three lengths whose gap falls by exactly 0.1 per e-fold of tokens per parameter: the log-linear fit is
    that line and reaches zero at T = e^3 x 10 = 200.9, and the table states its value at T = 200.9."""
    import math

    folders = []
    for i, iters in enumerate((10, 27, 74)):  # tokens per parameter 10, 27, 74 with 100 tokens a step
        gap = 0.3 - 0.1 * math.log(iters / 10)
        folders.append(str(tmp_path / f"s{i}"))
        _study(folders[-1], iters, {("baseline", 0): 2.0, ("est", 0): 2.0 + gap + 0.01, ("control-i9", 0): 2.01})
    main(["--out", str(tmp_path / "out"), "--params", "100", *folders, "--predict-at", "200.9"])
    text = open(tmp_path / "out" / "series.md").read()
    assert "log-linear: gap = 0.5303 -0.1000 ln T" in text and "zero at T = 201 tokens per parameter" in text
    assert "| 200.9 | -0.000 (-0.000 to -0.000) |" in text  # exact points: no scatter, no interval
