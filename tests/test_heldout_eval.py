"""--extra-valid-data-path: held-out sets evaluated on the full model beside the validation split."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_est.config import Config, DataConfig, TrainConfig
from megatron_est.data.errors import DataError
from megatron_est.data.indexed_dataset import write_indexed_dataset
from megatron_est.data.tokenizers import gpt2_files
from megatron_est.est.build import build_sampler
from megatron_est.model.language_model import LanguageModel
from megatron_est.parallel.state import ParallelState
from megatron_est.training.batches import MicroBatches, RandomTokens
from megatron_est.training.engine import TorchEngine
from megatron_est.training.evaluate import evaluate
from megatron_est.training.loop import train
from megatron_est.training.metrics import MetricsLog
from megatron_est.training.pretrain import build_data, extra_valid_name
from tests.helpers import ROOT, tiny


def _loop_cfg() -> Config:
    return Config(model=tiny("gpt2", num_layers=2),
                  train=TrainConfig(micro_batch_size=2, global_batch_size=2, train_iters=6, lr=3e-3,
                                    lr_warmup_iters=1, log_interval=3, eval_interval=3, eval_iters=2))


def test_extra_sets_logged_by_name_and_equal_an_independent_evaluation():
    cfg, st = _loop_cfg(), ParallelState()
    model = LanguageModel(cfg.model, st, seed=1)
    m = cfg.model

    def batches(seed):
        return MicroBatches(RandomTokens(m.vocab_size, m.seq_length, n=64, seed=seed), 2, 2, 1, 0)

    valid, other = batches(5), batches(9)
    state = train(cfg, st, TorchEngine(cfg, st, model), build_sampler(cfg), batches(2), valid,
                  log=MetricsLog(None, enabled=False), extra_valid_batches={"same": batches(5), "other": other})
    evals = [r for r in state.history if "val_loss" in r]
    assert [r["iteration"] for r in evals] == [3, 6]
    for r in evals:
        assert r["extra_val_loss"]["same"] == r["val_loss"]  # same samples, same model: identical
        assert r["extra_val_loss"]["other"] != r["val_loss"]
    assert evals[-1]["extra_val_loss"]["other"] == pytest.approx(evaluate(model, other, 2, st), abs=1e-7)


def _prefix(path, first_token: int, docs: int) -> str:
    """Documents of tokens first_token + [0, 100): each source has its own token range."""
    rng = np.random.default_rng(first_token)
    write_indexed_dataset(str(path), [first_token + rng.integers(0, 100, size=40 + 7 * i) for i in range(docs)],
                          np.uint16)
    return str(path)


def _data_cfg(tmp_path, train_prefix, extra):
    vocab, merges = gpt2_files()
    model = dataclasses.replace(tiny("gpt2"), seq_length=16)
    return Config(model=model, train=TrainConfig(micro_batch_size=2, train_iters=4, eval_iters=3),
                  data=DataConfig(data_path=[train_prefix], extra_valid_data_path=extra, split="9,1,0",
                                  tokenizer_type="GPT2BPETokenizer", vocab_file=vocab, merge_file=merges,
                                  cache_dir=str(tmp_path / "cache")))


def test_extra_set_uses_all_of_its_documents_and_only_them(tmp_path):
    train_p = _prefix(tmp_path / "plays_text_document", 0, docs=10)
    wiki = _prefix(tmp_path / "wiki_text_document", 1000, docs=3)
    _, train_ds, valid_ds, extra = build_data(_data_cfg(tmp_path, train_p, [wiki]), ParallelState())
    assert list(extra) == ["wiki"]
    tokens = np.concatenate([extra["wiki"][i]["tokens"].numpy() for i in range(len(extra["wiki"]))])
    assert tokens.min() >= 1000 and len(extra["wiki"]) >= 3 * 2  # eval_iters x global batch
    valid = np.concatenate([valid_ds[i]["tokens"].numpy() for i in range(len(valid_ds))])
    assert valid.max() < 1000  # the validation split still comes from --data-path


def test_two_extra_sets_with_one_name_are_refused(tmp_path):
    train_p = _prefix(tmp_path / "plays_text_document", 0, docs=10)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = _prefix(tmp_path / "a" / "wiki_text_document", 1000, docs=2)
    b = _prefix(tmp_path / "b" / "wiki_text_document", 2000, docs=2)
    with pytest.raises(DataError, match="--extra-valid-data-path"):
        build_data(_data_cfg(tmp_path, train_p, [a, b]), ParallelState())
    assert extra_valid_name("/x/wikipedia_text_document") == "wikipedia" and extra_valid_name("/x/y/") == "y"


def test_missing_extra_set_is_one_line_and_exit_2(tmp_path):
    train_p = _prefix(tmp_path / "plays_text_document", 0, docs=10)
    vocab, merges = gpt2_files()
    missing = str(tmp_path / "nowhere_text_document")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--data-path", train_p,
                          "--extra-valid-data-path", missing, "--tokenizer-type", "GPT2BPETokenizer",
                          "--vocab-file", vocab, "--merge-file", merges, "--num-layers", "1", "--hidden-size", "32",
                          "--num-attention-heads", "2", "--seq-length", "16", "--train-iters", "10",
                          "--data-cache-dir", str(tmp_path / "cache"), "--num-threads", "1",
                          "--metrics-file", str(tmp_path / "m.jsonl")],
                         capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere_text_document" in lines[0], res.stderr
    assert not os.path.exists(tmp_path / "m.jsonl") or not [
        json.loads(x) for x in open(tmp_path / "m.jsonl") if "lm_loss" in x]
