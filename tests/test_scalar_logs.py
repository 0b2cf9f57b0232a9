"""--tensorboard-dir: event files read back with tensorboard's own reader, under Megatron's tag names and at the
right steps; --eval-tasks in training equals tools/evaluate.py on the checkpoint of the same iteration."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_est.config import Config, ConfigError, TrainConfig
from megatron_est.est.build import build_sampler
from megatron_est.model.language_model import LanguageModel
from megatron_est.parallel.state import ParallelState
from megatron_est.training.batches import MicroBatches, RandomTokens
from megatron_est.training.engine import TorchEngine
from megatron_est.training.loop import train
from megatron_est.training.metrics import MetricsLog
from megatron_est.training.scalar_logs import TensorBoardSink, build_sinks, scalars
from tests.helpers import ROOT, tiny

pytest.importorskip("tensorboard")


def _events(log_dir: str) -> dict:
    """tag -> [(step, value)] through tensorboard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_training_scalars_read_back_by_tensorboard(tmp_path):
    cfg = Config(model=tiny("gpt2", num_layers=2),
                 train=TrainConfig(micro_batch_size=2, global_batch_size=2, train_iters=6, lr=3e-3,
                                   lr_warmup_iters=1, log_interval=2, eval_interval=3, eval_iters=1))
    cfg.est.schedule = "0:0.5,0.5,0.5;2:0.5,0.5,1;4:1,1,1"
    st, m = ParallelState(), cfg.model
    model = LanguageModel(m, st, seed=1)
    log = MetricsLog(None, enabled=True)
    log.sinks = [TensorBoardSink(str(tmp_path / "tb"), world_size=1)]

    def batches(seed):
        return MicroBatches(RandomTokens(m.vocab_size, m.seq_length, n=32, seed=seed), 2, 2, 1, 0)

    state = train(cfg, st, TorchEngine(cfg, st, model), build_sampler(cfg), batches(0), batches(1),
                  log=log, extra_valid_batches={"held": batches(2)})
    log.close()
    ev = _events(str(tmp_path / "tb"))
    train_recs = [r for r in state.history if "lm_loss" in r]
    val_recs = [r for r in state.history if "val_loss" in r]
    assert [s for s, _ in ev["lm loss"]] == [2, 4, 6]
    for tag, key in (("lm loss", "lm_loss"), ("learning-rate", "lr"), ("grad-norm", "grad_norm"),
                     ("est/stage", "est_stage"), ("est/kept-layers", "kept_layers"),
                     ("est/step-flops", "step_flops"), ("est/flops-saved-so-far", "flops_saved_frac")):
        assert [v for _, v in ev[tag]] == pytest.approx([r[key] for r in train_recs], rel=1e-6), tag
    assert [v for _, v in ev["est/stage"]] == [1, 2, 3]
    assert [s for s, _ in ev["lm loss vs samples"]] == [4, 8, 12]
    assert [s for s, _ in ev["lm loss vs tokens"]] == [r["tokens"] for r in train_recs]
    assert [s for s, _ in ev["lm loss validation"]] == [3, 6]
    assert [v for _, v in ev["lm loss validation"]] == pytest.approx([r["val_loss"] for r in val_recs], rel=1e-6)
    assert ev["lm loss validation ppl"][-1][1] == pytest.approx(math.exp(val_recs[-1]["val_loss"]), rel=1e-5)
    assert [v for _, v in ev["held lm loss validation"]] == pytest.approx(
        [r["extra_val_loss"]["held"] for r in val_recs], rel=1e-6)
    r = train_recs[-1]
    assert ev["throughput"][-1][1] == pytest.approx(r["step_flops"] / r["interval_time_s"] / 1e12, rel=1e-5)


def test_scalars_skip_nan_and_name_downstream_tasks():
    rec = {"iteration": 5, "val_loss": 2.0, "downstream": {"piqa": {"acc": 0.6, "acc_norm": 0.55}}}
    tags = {t: (v, s) for t, v, s in scalars(rec)}
    assert tags["downstream/piqa acc"] == (0.6, 5) and tags["downstream/piqa acc_norm"] == (0.55, 5)
    nan_rec = {"iteration": 1, "lm_loss": 3.0, "grad_norm": float("nan"), "consumed_samples": 2, "tokens": 8,
               "step_flops": 1, "interval_time_s": 0.0}
    assert "grad-norm" not in {t for t, _, _ in scalars(nan_rec)}


def test_wandb_project_without_wandb_is_refused_in_one_line():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    cfg = Config(train=TrainConfig(wandb_project="p"))
    with pytest.raises(ConfigError, match="--wandb-project needs the wandb package"):
        build_sinks(cfg, 0, 1)


def _gpt2_corpus(tmp_path) -> str:
    """A small indexed dataset of Shakespeare in GPT-2 BPE (no tokenizer to train)."""
    from megatron_est.data.corpus import shakespeare_files
    from megatron_est.data.indexed_dataset import write_indexed_dataset
    from megatron_est.data.tokenizers import GPT2BPETokenizer, gpt2_files

    tok = GPT2BPETokenizer(*gpt2_files())
    with open(shakespeare_files()[0]) as f:
        text = f.read()[:60000]
    docs = [tok.encode(text[i:i + 3000]) + [tok.eod] for i in range(0, len(text), 3000)]
    return write_indexed_dataset(str(tmp_path / "corpus_text_document"), docs, np.uint16)


@pytest.mark.slow
def test_cli_eval_tasks_logged_and_equal_to_tools_evaluate(tmp_path):
    pytest.importorskip("lm_eval")
    from megatron_est.data.tokenizers import gpt2_files
    from tools import evaluate as tool

    vocab, merges = gpt2_files()
    tb, metrics, ckpt = tmp_path / "tb", tmp_path / "m.jsonl", tmp_path / "ckpt"
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "64",
            "--micro-batch-size", "4", "--train-iters", "4", "--log-interval", "2", "--eval-interval", "2",
            "--eval-iters", "1", "--lr-warmup-iters", "1", "--data-path", _gpt2_corpus(tmp_path),
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
            "--data-cache-dir", str(tmp_path / "cache"), "--num-threads", "1", "--metrics-file", str(metrics),
            "--tensorboard-dir", str(tb), "--eval-tasks", "arc_easy,lambada", "--eval-limit", "3",
            "--save", str(ckpt), "--save-interval", "4"]
    res = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *argv], capture_output=True,
                         text=True, timeout=600, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "downstream: arc_easy acc" in res.stdout
    evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if "downstream" in r]
    assert [r["iteration"] for r in evals] == [2, 4]
    ev = _events(str(tb))
    assert [s for s, _ in ev["downstream/lambada perplexity"]] == [2, 4]
    assert ev["downstream/lambada perplexity"][-1][1] == pytest.approx(
        evals[-1]["downstream"]["lambada"]["perplexity"], rel=1e-5)
    out = tool.run(tool._parser().parse_args(["--load", str(ckpt), "--tasks", "arc_easy,lambada", "--limit", "3",
                                              "--vocab-file", vocab, "--merge-file", merges]))
    offline = {r["task"]: r for r in out["tasks"]}
    for task in ("arc_easy", "lambada"):  # the same weights, the same requests: the same figures
        for metric, v in evals[-1]["downstream"][task].items():
            assert offline[task][metric] == pytest.approx(v, rel=1e-4), (task, metric)


def test_cli_bad_eval_tasks_is_one_line(tmp_path):
    from megatron_est.data.tokenizers import gpt2_files

    vocab, merges = gpt2_files()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--eval-tasks", "piqa,nope",
                          "--data-path", _gpt2_corpus(tmp_path), "--tokenizer-type", "GPT2BPETokenizer",
                          "--vocab-file", vocab, "--merge-file", merges, "--num-layers", "1", "--hidden-size", "32",
                          "--num-attention-heads", "2", "--seq-length", "32", "--data-cache-dir",
                          str(tmp_path / "cache")], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == ["error: --eval-tasks: unknown task 'nope' (known: all, "
                                               "arc_easy, arc_challenge, piqa, hellaswag, winogrande, boolq, sciq, "
                                               "lambada)"]
