"""--est-target-saving: the schedule's stage starts scale by one factor to the requested training-FLOPs saving."""
import json
import os
import subprocess
import sys

import pytest

from megatron_est.config import Config, ConfigError, ESTConfig, ModelConfig, TrainConfig, model_preset
from megatron_est.validation import validate
from megatron_est.est.build import build_sampler
from megatron_est.est.fit import format_schedule
from megatron_est.est.savings import saving, schedule_flops
from tests.helpers import ROOT
from tools.est_flops import main as est_flops_main

GPT2_PAPER_SPEC = "0%:0.5,0.5,0.5;29.3%:0.5,0.5,1;58.6%:1,1,1"


def _cfg(model: ModelConfig, schedule: str, target, iters: int, **est) -> Config:
    return Config(model=model, est=ESTConfig(schedule=schedule, target_saving=target, **est),
                  train=TrainConfig(train_iters=iters))


def _real_saving(cfg: Config) -> tuple[float, list]:
    """The saving counted step by step as training counts it (not the fit's own per-stage shortcut)."""
    stages = schedule_flops(cfg.model, build_sampler(cfg), cfg.train.train_iters, cfg.model.seq_length)
    return saving(stages), stages


def test_gpt2_stages_one_and_two_of_equal_length_by_hand():
    model = ModelConfig(family="gpt2", num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=128,
                        vocab_size=1024)
    cfg = _cfg(model, GPT2_PAPER_SPEC, 0.25, 2400)
    got, stages = _real_saving(cfg)
    assert got == pytest.approx(0.25, abs=0.005)
    # Per token the LM head costs as much as one layer, so stage 1 (2 of 4 layers at half width) runs 0.4 of
    # the full step and stage 2 (4 layers at half width) 0.6; stages of length x each save 0.6x + 0.4x = 0.25.
    assert [round(s.flops / s.full_flops, 6) for s in stages] == [0.4, 0.6, 1.0]
    assert [s.iterations for s in stages] == [600, 600, 1200]
    assert format_schedule(build_sampler(cfg).schedule) == "0:0.5,0.5,0.5;600:0.5,0.5,1;1200:1,1,1"


@pytest.mark.parametrize("stratified", [True, False])  # unstratified: the KV heads used vary from step to step
@pytest.mark.parametrize("target", [0.1, 0.3])
def test_llama_gqa_lands_within_half_a_point(target, stratified):
    model = model_preset("llama-tiny", num_layers=4, hidden_size=128, ffn_hidden_size=344, vocab_size=1024)
    assert model.queries_per_group > 1
    cfg = _cfg(model, "tinyllama-paper", target, 1500, stratified=stratified)
    assert _real_saving(cfg)[0] == pytest.approx(target, abs=0.005)


def test_schedule_shrinks_and_grows_and_drops_empty_stages():
    model = ModelConfig(family="gpt2", num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=128,
                        vocab_size=1024)
    small = build_sampler(_cfg(model, GPT2_PAPER_SPEC, 0.05, 1000)).schedule
    assert [s.start for s in small.stages][0] == 0 and small.stages[1].start < 293
    # The first stage alone saves 0.6 (it runs 0.4 of the full step): reaching that drops the later stages.
    big = build_sampler(_cfg(model, "0:0.5,0.5,0.5;10:0.5,0.5,1;20:1,1,1", 0.6, 1000)).schedule
    assert len(big.stages) == 1 and big.stages[0].start == 0


def test_unreachable_target_is_refused_with_the_maximum():
    model = ModelConfig(family="gpt2", num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=128,
                        vocab_size=1024)
    with pytest.raises(ConfigError, match=r"--est-target-saving 0\.7 is unreachable.* at most 60\.0%"):
        build_sampler(_cfg(model, GPT2_PAPER_SPEC, 0.7, 2400))


@pytest.mark.parametrize("schedule,target,match", [("none", 0.2, "sub-full stage"), ("default", 0.0, r"\(0, 1\)"),
                                                   ("default", 1.0, r"\(0, 1\)"), ("default", -0.1, r"\(0, 1\)")])
def test_invalid_targets_are_refused_up_front(schedule, target, match):
    cfg = _cfg(model_preset("gpt2-tiny"), schedule, target, 100)
    for check in (lambda: validate(cfg, 1), lambda: build_sampler(cfg)):
        with pytest.raises(ConfigError, match="--est-target-saving.*" + match):
            check()


def test_training_run_logs_the_target_saving(tmp_path):
    # The bundled corpus (sentencepiece vocabulary 8192) from the repository's cache, as other CLI tests use it.
    # 4 layers at seq 128 keep the layers' share of the FLOPs high enough for 20% (at most 25% here).
    metrics = tmp_path / "m.jsonl"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--num-layers", "4",
                          "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
                          "--micro-batch-size", "2", "--train-iters", "40", "--est-target-saving", "0.2",
                          "--num-threads", "1", "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "5",
                          "--metrics-file", str(metrics), "--data-cache-dir", os.path.join(ROOT, ".cache")],
                         capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    records = [json.loads(x) for x in open(metrics) if "flops_saved_frac" in x]
    assert records[-1]["iteration"] == 40
    assert records[-1]["flops_saved_frac"] == pytest.approx(0.2, abs=0.02)
    assert "scaled for --est-target-saving 0.2: 0:0.5,0.5,0.5;" in res.stdout


def test_flops_tool_prints_the_resolved_schedule(capsys):
    total = est_flops_main(["--model-preset", "gpt2-124m", "--est-schedule", "gpt2-paper", "--train-iters", "1000",
                            "--est-target-saving", "0.2"])
    assert total == pytest.approx(0.2, abs=0.005)
    assert "gpt2-paper scaled for --est-target-saving 0.2: 0:0.5,0.5,0.5;" in capsys.readouterr().out
