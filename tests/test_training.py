"""Training loop: DP all-reduce with skipped layers, LR schedule, metrics file, and the CLI end to end."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_est.config import Config, ESTConfig, ParallelConfig, TrainConfig
from megatron_est.est.build import build_sampler
from megatron_est.model.language_model import LanguageModel
from megatron_est.parallel.state import ParallelState, build_groups
from megatron_est.training.batches import MicroBatches, RandomTokens
from megatron_est.training.engine import TorchEngine
from megatron_est.training.loop import train
from megatron_est.training.metrics import MetricsLog
from megatron_est.training.optimizer import learning_rate
from tests.helpers import ROOT, run_distributed, tiny

SCHEDULE = "0:0.5,0.5,0.5;3:0.5,0.5,1;5:1,1,1"  # crosses all three stages in 7 iterations


def _cfg(tp=1):
    return Config(model=tiny("gpt2", num_layers=4), parallel=ParallelConfig(tensor_model_parallel_size=tp),
                  est=ESTConfig(schedule=SCHEDULE, tp_strata=2),
                  train=TrainConfig(micro_batch_size=2, global_batch_size=4, train_iters=7, lr=3e-3,
                                    lr_warmup_iters=2, log_interval=1, eval_interval=100, eval_iters=1))


def _train(st: ParallelState, tp: int = 1):
    cfg = _cfg(tp)
    model = LanguageModel(cfg.model, st, seed=4)
    data = RandomTokens(cfg.model.vocab_size, cfg.model.seq_length, n=64, seed=2)
    batches = MicroBatches(data, 4, 2, st.dp, st.dp_rank)
    state = train(cfg, st, TorchEngine(cfg, st, model), build_sampler(cfg), batches, None,
                  log=MetricsLog(None, enabled=False))
    losses = [r["lm_loss"] for r in state.history]
    norms = [r["grad_norm"] for r in state.history]
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _dp_worker(rank, world):
    return _train(build_groups(ParallelState(world, rank, tp=1, pp=1, dp=world)))


def _tp_worker(rank, world):
    return _train(build_groups(ParallelState(world, rank, tp=world, pp=1, dp=1)), tp=world)


@pytest.fixture(scope="module")
def single():
    return _train(ParallelState())


def test_dp2_equals_single_process_with_skipped_layers(single):
    ref_losses, ref_norms, ref_w = single
    assert ref_losses[-1] < ref_losses[0]
    for losses, norms, weights in run_distributed(_dp_worker, 2):
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert norms == pytest.approx(ref_norms, rel=1e-4)
        for k in ref_w:
            torch.testing.assert_close(weights[k], ref_w[k], rtol=1e-4, atol=1e-6, msg=k)


def test_tp2_training_equals_single_process(single):
    """Includes the TP-aware gradient norm used for clipping."""
    ref_losses, ref_norms, _ = single
    for losses, norms, _ in run_distributed(_tp_worker, 2):
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert norms == pytest.approx(ref_norms, rel=1e-4)


def test_learning_rate_warmup_then_cosine():
    tr = TrainConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10, train_iters=110)
    assert learning_rate(tr, 0) == pytest.approx(0.1)
    assert learning_rate(tr, 9) == pytest.approx(1.0)
    assert learning_rate(tr, 60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(tr, 110) == pytest.approx(0.1)
    assert learning_rate(tr, 500) == pytest.approx(0.1)


SMALL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
         "--micro-batch-size", "2", "--train-iters", "12", "--log-interval", "2", "--eval-interval", "6",
         "--eval-iters", "1", "--lr-warmup-iters", "2", "--est-schedule", "0:0.5,0.5,0.5;4:0.5,0.5,1;8:1,1,1"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("script", ["pretrain_gpt.py", "pretrain_llama.py"])
def test_cli_end_to_end_metrics_file(script, data_cache, tmp_path):
    metrics = tmp_path / "m.jsonl"
    extra = ["--num-query-groups", "2", "--ffn-hidden-size", "128"] if "llama" in script else []
    res = subprocess.run([sys.executable, os.path.join(ROOT, script), *SMALL, *extra, "--data-cache-dir",
                          data_cache, "--metrics-file", str(metrics), "--num-threads", "1"],
                         capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FLOPs saved" in res.stdout and "final validation loss" in res.stdout
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    train_recs = [r for r in recs if "lm_loss" in r]
    assert [r["iteration"] for r in train_recs] == [2, 4, 6, 8, 10, 12]
    keys = {"iteration", "lm_loss", "lr", "grad_norm", "tokens", "step_flops", "full_step_flops", "est_stage",
            "kept_layers", "kept_heads_frac", "kept_mlp_frac", "step_time_s"}
    assert keys <= set(train_recs[0])
    assert [r["est_stage"] for r in train_recs] == [1, 1, 2, 2, 3, 3]
    assert train_recs[0]["kept_layers"] == 1 and train_recs[2]["kept_layers"] == 2
    assert train_recs[0]["step_flops"] < train_recs[2]["step_flops"] < train_recs[-1]["step_flops"]
    assert train_recs[-1]["step_flops"] == train_recs[-1]["full_step_flops"]
    assert train_recs[-1]["tokens"] == 12 * 2 * 64
    assert [r["iteration"] for r in recs if "val_loss" in r] == [6, 12]
    assert train_recs[-1]["lm_loss"] < train_recs[0]["lm_loss"]
