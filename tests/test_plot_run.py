"""tools/plot_run.py: the curves it reads (hand-computed axes) and the PNG it writes; bad input in one line."""
import json

import matplotlib.image as mpimg
import pytest

from megatron_est.study.curves import read_curves
from tools import plot_run


def _metrics(path, scale=1.0):
    recs = [{"iteration": 10, "lm_loss": 5.0 * scale, "tokens": 640, "cumulative_flops": 100,
             "interval_time_s": 0.5},
            {"iteration": 10, "val_loss": 4.9 * scale, "cumulative_flops": 100},
            {"iteration": 20, "lm_loss": 4.0 * scale, "tokens": 1280, "cumulative_flops": 300,
             "interval_time_s": 0.25},
            {"iteration": 20, "val_loss": 3.9 * scale, "cumulative_flops": 300, "downstream": {"piqa": {"acc": 0.5}}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_read_curves_axes(tmp_path):
    c = read_curves(_metrics(tmp_path / "a.jsonl"))
    assert c.train["iterations"] == [10, 20] and c.train["tokens"] == [640, 1280]
    assert c.train["time"] == [5.0, 7.5]  # 10 x 0.5 s, then 10 x 0.25 s more
    assert c.val["loss"] == [4.9, 3.9] and c.val["tokens"] == [640, 1280] and c.val["flops"] == [100, 300]


def test_plot_several_runs_to_png(tmp_path, capsys):
    out = tmp_path / "fig" / "loss.png"
    assert plot_run.main([f"base={_metrics(tmp_path / 'a.jsonl')}", _metrics(tmp_path / "est.jsonl", 1.1),
                          "--out", str(out), "--axes", "flops", "time"]) == 0
    assert "2 runs" in capsys.readouterr().out
    img = mpimg.imread(str(out))
    assert img.shape[1] > img.shape[0] > 100


@pytest.mark.parametrize("content,needle", [(None, "not found"), ('{"iteration": 1, "val_loss": 2}\n',
                                                                   "no training loss")])
def test_bad_metrics_file_is_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "m.jsonl"
    if content is not None:
        path.write_text(content)
    assert plot_run.main([str(path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(path) in err[0]
