"""The reproduction report's downstream column: zero-shot accuracy of each method's last evaluation."""
import json

import pytest

from megatron_est.study.report import downstream_table, load_run


def _run(path, accs):
    recs = [{"iteration": 5, "lm_loss": 3.0, "interval_time_s": 0.1, "cumulative_flops": 10, "est_stage": 1},
            {"iteration": 5, "val_loss": 2.9, "cumulative_flops": 10,
             "downstream": {"piqa": {"acc": 0.1}, "sciq": {"acc": 0.2}}},
            {"iteration": 10, "val_loss": 2.5, "cumulative_flops": 20,
             "downstream": {t: {"acc": a, "acc_norm": 0.0} for t, a in accs.items()}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_downstream_table_by_hand(tmp_path):
    runs = [load_run(_run(tmp_path / "b0.jsonl", {"piqa": 0.5, "sciq": 0.3}), "baseline", 0),
            load_run(_run(tmp_path / "b1.jsonl", {"piqa": 0.7, "sciq": 0.5}), "baseline", 1),
            load_run(_run(tmp_path / "e0.jsonl", {"piqa": 0.6}), "est", 0)]
    assert runs[0].final_downstream == {"piqa": 0.5, "sciq": 0.3}  # the last evaluation's accuracy
    table, out = downstream_table(runs)
    assert out["baseline"]["piqa"]["mean"] == pytest.approx(0.6)
    assert out["baseline"]["piqa"]["sd"] == pytest.approx(0.1414, abs=1e-4)
    assert "sciq" not in out["est"]
    assert table.splitlines()[0] == "| method | seeds | piqa acc | sciq acc |"
    assert table.splitlines()[-1] == "| est | 1 | 0.6000 ± 0.0000 | - |"
    # A last evaluation without tasks: nothing to report.
    assert downstream_table([load_run(_run(tmp_path / "n.jsonl", {}), "baseline", 0)]) == ("", {})
