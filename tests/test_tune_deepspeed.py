"""tools/tune_deepspeed.py: plans that fit, emitted JSON and flags that training accepts unchanged, refusals;
slow tier: the top plans measured on CPU and the emitted plan training a tiny stand-in model with torchrun."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

from megatron_est.arguments import parse_args
from megatron_est.validation import validate
from megatron_est.planning.dry_run import rank_memory
from megatron_est.planning.memory import GiB
from tests.helpers import ROOT
from tools.tune_deepspeed import main

TINY = ["--model-preset", "gpt2-tiny", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--vocab-size", "512", "--seq-length", "32", "--global-batch-size", "8", "--train-iters", "4",
        "--est-schedule", "0:0.5,0.5,0.5;2:1,1,1", "--num-threads", "1"]


def _accepted(out, world: int):
    flags = shlex.split(open(os.path.join(out, "plan.flags")).read())
    # reads and checks the emitted JSON against the flags, as training does; the resolved config has its stage
    cfg = validate(parse_args(flags, "t", "gpt2-tiny"), world).config
    return cfg, json.load(open(os.path.join(out, "ds_config.json")))


def test_gpt2_124m_on_one_node_of_8_x_24_gb(tmp_path, capsys):
    best = main(["--model-preset", "gpt2-124m", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gib", "24",
                 "--global-batch-size", "512", "--est-schedule", "gpt2-paper", "--train-iters", "20000",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert best.fits and best.free >= 0.1 * 24 * GiB and "Chosen: ZeRO-" in out
    cfg, conf = _accepted(tmp_path, 8)
    assert conf["zero_optimization"]["stage"] == best.cand.zero_stage == cfg.engine.zero_stage
    assert conf["train_micro_batch_size_per_gpu"] * conf["gradient_accumulation_steps"] * best.dp == 512
    env = open(tmp_path / "plan.env").read()
    assert f"export TP={best.cand.tp}" in env and f"export MICRO_BATCH={best.cand.micro_batch}" in env
    # The dry run of the emitted plan (which reads the JSON's buckets) finds the tuner's peak.
    peaks = [m.peak for stage in cfg_stages(cfg) for m in rank_memory(cfg, 8, stage=stage)]
    assert max(peaks) == pytest.approx(best.peak, rel=1e-9)


def cfg_stages(cfg):
    from megatron_est.est.build import build_sampler

    return build_sampler(cfg).schedule.stages


def test_tinyllama_on_4_x_8_x_40_gb_leaves_the_margin_and_drops_what_does_not_fit(tmp_path, capsys):
    best = main(["--model-preset", "tinyllama-1.1b", "--nodes", "4", "--gpus-per-node", "8", "--gpu-memory-gib", "40",
                 "--global-batch-size", "512", "--est-schedule", "tinyllama-paper", "--train-iters", "50000",
                 "--out", str(tmp_path), "--top", "3"])
    out = capsys.readouterr().out
    assert best.peak <= 0.9 * 40 * GiB
    dropped = int(out.split(" do not fit the memory")[0].rsplit(", ", 1)[1].split()[0])
    assert dropped > 0 and "closest plans that do not fit" in out
    _accepted(tmp_path, 32)


@pytest.mark.parametrize("argv,msg", [(["--nodes", "0", "--gpus-per-node", "8", "--gpu-memory-gib", "8"], "--nodes"),
                                      (["--nodes", "1", "--gpus-per-node", "2", "--gpu-memory-gib", "1e-6"],
                                       "no plan fits"),
                                      pytest.param(["--nodes", "1", "--gpus-per-node", "2", "--gpu-memory-gib", "8",
                                                    "--precision", "fp16"], "--fp16 under --deepspeed needs a GPU",
                                                   marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                            reason="refused only without a GPU"))])
def test_refusals_are_one_line(argv, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*argv, *TINY, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and msg in err[-1] and err[-1].startswith("error: ")


@pytest.mark.slow
def test_measured_top_plans_and_the_emitted_plan_trains_a_tiny_model(tmp_path):
    env_keep = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                if k in os.environ}
    try:
        data = ["--data-cache-dir", str(tmp_path / "cache")]
        best = main(["--nodes", "1", "--gpus-per-node", "2", "--gpu-memory-gib", "1", "--precision", "fp32",
                     "--measure-top-k", "2", "--measure-steps", "3", *TINY, *data, "--out", str(tmp_path)])
        assert best.measured_step is not None and best.measured_step > 0
        flags = shlex.split(open(tmp_path / "plan.flags").read())
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        run = subprocess.run([*torchrun, os.path.join(ROOT, "pretrain_gpt.py"), *flags], cwd=str(tmp_path),
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        assert "final train loss" in run.stdout
    finally:
        os.environ.update(env_keep)
