"""A resumed run's metrics file: records the killed run logged after its last checkpoint are dropped, so each
iteration appears once and the losses equal an uninterrupted run's."""
import json
import shutil

import numpy as np

from megatron_est.training.metrics import truncate_records
from megatron_est.training.pretrain import main
from tests.helpers import tiny_cli_argv

ITERS = 12


def _argv(tmp_path, metrics, extra=()):
    return [*tiny_cli_argv(tmp_path, iters=ITERS, eval_interval=3), "--metrics-file", str(metrics), *extra]


def _records(path):
    return [json.loads(line) for line in open(path)]


def test_resume_drops_records_past_the_checkpoint(tmp_path):
    whole = tmp_path / "whole.jsonl"
    main(_argv(tmp_path, whole))
    ck, snap, m = str(tmp_path / "ck"), str(tmp_path / "ck_at_4"), tmp_path / "m.jsonl"
    save = ["--save", ck, "--load", ck]
    main(_argv(tmp_path, m, save + ["--exit-interval", "4"]))  # checkpoint at 4
    shutil.copytree(ck, snap)
    main(_argv(tmp_path, m, save + ["--exit-interval", "8"]))  # logs 5..8, saves 8
    shutil.rmtree(ck)
    shutil.copytree(snap, ck)  # what a kill between checkpoints 4 and 8 leaves: checkpoint 4, records to 8
    with open(m, "a") as f:
        f.write('{"iteration": 9, "lm_lo')  # and a line the kill cut short
    main(_argv(tmp_path, m, save))  # resumes at 4
    got, ref = _records(m), _records(whole)
    train = [r["iteration"] for r in got if "lm_loss" in r]
    assert train == list(range(1, ITERS + 1))
    assert [r["iteration"] for r in got if "val_loss" in r] == [3, 6, 9, 12]
    ref_loss = {r["iteration"]: r["lm_loss"] for r in ref if "lm_loss" in r}
    np.testing.assert_allclose([r["lm_loss"] for r in got if "lm_loss" in r],
                               [ref_loss[i] for i in train], rtol=1e-6)


def test_truncate_keeps_records_through_the_iteration(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"iteration": 1, "a": 1}\n{"note": "no iteration"}\n{"iteration": 2}\n{"iteration": 3}\n{"itera')
    truncate_records(str(p), 2)
    assert _records(p) == [{"iteration": 1, "a": 1}, {"note": "no iteration"}, {"iteration": 2}]
    assert not (tmp_path / "m.jsonl.tmp").exists()
