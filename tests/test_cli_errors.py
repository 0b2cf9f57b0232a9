"""Invalid flag combinations are refused up front: one line on stderr naming the flag, exit status 2."""
import os
import subprocess
import sys

import pytest

from megatron_est.training.pretrain import main
from tests.helpers import ROOT

CASES = [
    (["--num-attention-heads", "6", "--hidden-size", "384", "--tensor-model-parallel-size", "4"], 4,
     "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--model-preset", "llama-tiny", "--num-query-groups", "3"], 1, "--num-query-groups 3"),
    (["--model-preset", "llama-tiny", "--tensor-model-parallel-size", "4"], 4,
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (["--est-schedule", "0:1.5,0.5,0.5"], 1, "--est-schedule: rates must lie in (0, 1]"),
    (["--est-schedule", "0:0,0.5,0.5"], 1, "--est-schedule: rates must lie in (0, 1]"),
    (["--est-schedule", "fastest"], 1, "--est-schedule: unknown preset 'fastest'"),
    (["--model-preset", "gpt5"], 1, "--model-preset: unknown preset 'gpt5'"),
    (["--tensor-model-parallel-size", "3"], 4, "world size 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--global-batch-size", "10", "--micro-batch-size", "4"], 1, "--global-batch-size 10 is not divisible"),
    (["--est-tp-strata", "3"], 1, "--est-tp-strata 3"),
    (["--est-unsampled-update", "sgd"], 1, "--est-unsampled-update: unknown value 'sgd'"),
    (["--est-unsampled-update", "auto"], 1, "--est-unsampled-update: unknown value 'auto' (freeze or adamw"),
]


@pytest.mark.parametrize("argv,world,message", CASES)
def test_refused_with_one_line(argv, world, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_refusal_through_the_real_script(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--num-attention-heads", "5",
                          "--hidden-size", "320", "--tensor-model-parallel-size", "2"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: --num-attention-heads 5 is not divisible by --tensor-model-parallel-size 2"]
    assert not any(tmp_path.iterdir())  # nothing written


def test_every_rank_says_why_it_refuses(tmp_path):
    """Under torchrun or srun every rank refuses, and the launcher's summary names one of them: each prints the
    same line (rank 0 alone used to, and the rank a launcher blamed had printed nothing)."""
    argv = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--est-schedule", "fastest"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
                              env={**os.environ, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2
        errs.append(err.strip().splitlines())
    assert errs[0] == errs[1] and len(errs[0]) == 1, errs
    assert errs[0][0].startswith("error: --est-schedule: unknown preset 'fastest'")
