"""Pipeline layouts from the command line: refusals before any process group exists, and a torchrun PP=2 job
that logs the same losses as plain `python` on one process."""
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from megatron_est.parallel import state as pstate
from megatron_est.training.pretrain import main
from tests.helpers import ROOT

PP = "--pipeline-model-parallel-size"
CASES = [
    (["--tensor-model-parallel-size", "2", PP, "2"], 6,
     "world size 6 is not divisible by --tensor-model-parallel-size 2 x --pipeline-model-parallel-size 2"),
    (["--num-layers", "5", PP, "2"], 2, "--num-layers 5 is not divisible by --pipeline-model-parallel-size 2"),
    (["--num-layers", "8", PP, "3", "--decoder-first-pipeline-num-layers", "3"], 3,
     "--num-layers 8 minus --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers leaves 5 "
     "layers, not divisible by the 2 other stages"),
    (["--num-layers", "4", PP, "2", "--decoder-first-pipeline-num-layers", "1",
      "--decoder-last-pipeline-num-layers", "2"], 2,
     "--decoder-first-pipeline-num-layers 1 + --decoder-last-pipeline-num-layers 2 must equal --num-layers 4"),
    (["--decoder-last-pipeline-num-layers", "2"], 1, "need --pipeline-model-parallel-size > 1"),
    ([PP, "2", "--micro-batch-size", "2", "--global-batch-size", "6"], 4,
     "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    (["--num-layers", "6", PP, "2", "--decoder-first-pipeline-num-layers", "2", "--est-pp-strata", "4"], 2,
     "--est-pp-strata 4 must divide --num-layers 6"),
    (["--num-layers", "6", PP, "2", "--pipeline-partition", "balanced", "--decoder-last-pipeline-num-layers", "2"],
     2, "--pipeline-partition balanced chooses --decoder-first-pipeline-num-layers / "
        "--decoder-last-pipeline-num-layers itself"),
    ([PP, "2", "--pipeline-partition", "cost"], 2, "--pipeline-partition: unknown value 'cost'"),
]


@pytest.mark.parametrize("argv,world,message", CASES)
def test_refused_before_process_groups(argv, world, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(pstate, "initialize", lambda *a, **k: pytest.fail("process groups were built"))
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and not dist.is_initialized()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


ARGS = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "6", "--log-interval", "1",
        "--eval-interval", "6", "--eval-iters", "1", "--lr-warmup-iters", "2", "--adam-eps", "1e-4",
        "--est-schedule", "0:0.5,0.5,0.5;2:0.5,0.5,1;4:1,1,1", "--est-tp-strata", "1", "--est-pp-strata", "2",
        "--num-threads", "1"]  # the default --est-unsampled-update (adamw) is the same at PP=1 and PP=2


def _losses(path) -> list[float]:
    return [r.get("lm_loss", r.get("val_loss")) for r in map(json.loads, path.read_text().splitlines())]


def test_torchrun_pp2_equals_plain_python(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    common = [os.path.join(ROOT, "pretrain_gpt.py"), *ARGS, "--data-cache-dir", str(tmp_path / "cache")]
    single = subprocess.run([sys.executable, *common, "--metrics-file", str(tmp_path / "one.jsonl")],
                            capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    piped = subprocess.run([*torchrun, *common, PP, "2", "--metrics-file", str(tmp_path / "pp.jsonl")],
                           capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert "TP=1 PP=2 DP=1" in piped.stdout and "final validation loss" in piped.stdout
    one, pp = _losses(tmp_path / "one.jsonl"), _losses(tmp_path / "pp.jsonl")
    assert len(one) == 7  # six steps and one validation
    assert pp == pytest.approx(one, rel=1e-5)
