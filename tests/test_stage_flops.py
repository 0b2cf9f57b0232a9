"""Closed-form stage FLOPs (est/stage_flops.py) against drawing every step's subnetwork as training does."""
import math
import statistics
import time

import pytest

from megatron_est.config import Config, ESTConfig, ParallelConfig, TrainConfig, model_preset
from megatron_est.est.build import build_sampler
from megatron_est.est.flops import stage_step_flops, step_flops
from megatron_est.est.savings import saving, schedule_flops
from megatron_est.est.schedule import Stage
from megatron_est.est.stage_flops import closed_form_flops, pipeline_stage_flops, stage_shape
from tests.helpers import tiny
from tools.est_flops import main as est_flops_main

SCHEDULE = "0:0.5,0.25,0.5;7:0.25,0.5,1;13:0.75,0.5,0.75;19:1,1,1"


def _cfg(family="gpt2", tp=1, pp=1, stratified=True, iters=24, schedule=SCHEDULE, par=None, **model):
    m = tiny(family, num_layers=model.pop("num_layers", 8), **model)
    return Config(model=m, parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                   **(par or {})),
                  est=ESTConfig(schedule=schedule, stratified=stratified), train=TrainConfig(train_iters=iters))


@pytest.mark.parametrize("family,tp,pp,stratified", [("gpt2", 1, 1, True), ("gpt2", 2, 2, True),
                                                     ("llama", 2, 4, True), ("gpt2", 2, 2, False),
                                                     ("llama", 1, 2, True)])
def test_closed_form_equals_every_step_drawn(family, tp, pp, stratified):
    cfg = _cfg(family, tp, pp, stratified)
    tokens = 3 * cfg.model.seq_length
    drawn = schedule_flops(cfg.model, build_sampler(cfg), cfg.train.train_iters, tokens)
    assert closed_form_flops(cfg, build_sampler(cfg), cfg.train.train_iters, tokens) == drawn


def test_per_pipeline_stage_flops_equal_a_drawn_step_on_uneven_stages():
    # Strata of 2 layers (--est-pp-strata 5) line up with the 2 + 4 + 4 split: every step's counts are exact.
    cfg = _cfg("llama", 1, 3, num_layers=10,
               par=dict(decoder_first_pipeline_num_layers=2, decoder_last_pipeline_num_layers=4))
    cfg = Config(model=cfg.model, parallel=cfg.parallel, train=cfg.train,
                 est=ESTConfig(schedule=SCHEDULE, pp_strata=5))
    sampler = build_sampler(cfg)
    ranges = [(0, 2), (2, 6), (6, 10)]
    for it in (0, 8, 15, 20):
        sub = sampler(it)
        shape = stage_shape(cfg, sampler, sampler.schedule.stage_at(it))
        drawn = [stage_step_flops(cfg.model, 5, sub, r, with_head=i == 2) for i, r in enumerate(ranges)]
        assert shape.exact and pipeline_stage_flops(cfg, shape, 5) == drawn


def test_strata_crossing_stage_boundaries_give_the_drawn_mean_per_stage():
    # 8 layers in 2 strata of 4 (--est-pp-strata 2) over an uneven 3 + 5 split: stratum 0-3 crosses into stage
    # 1. By hand at p_L 0.5 (2 of each 4 kept): stage 0 holds 3 of stratum 0's 4 layers, 2 * 3/4 = 1.5 kept on
    # average; stage 1 holds layer 3 (0.5) and all of stratum 4-7 (2): 2.5. The whole model keeps 4, exactly.
    cfg = _cfg(pp=2, schedule="0:1,1,0.5", iters=1,
               par=dict(decoder_first_pipeline_num_layers=3, decoder_last_pipeline_num_layers=5))
    cfg = Config(model=cfg.model, parallel=cfg.parallel, train=cfg.train,
                 est=ESTConfig(schedule="0:1,1,0.5", pp_strata=2))
    sampler = build_sampler(cfg)
    shape = stage_shape(cfg, sampler, Stage(0, 1.0, 1.0, 0.5))
    assert shape.layers == (1.5, 2.5) and not shape.exact
    n = 2000
    per_stage = [[sum(i < 3 for i in sampler(it).layers), sum(i >= 3 for i in sampler(it).layers)] for it in range(n)]
    assert all(a + b == 4 for a, b in per_stage) and len({a for a, _ in per_stage}) == 2  # 1 or 2 on stage 0
    mean0 = statistics.fmean(a for a, _ in per_stage)
    assert abs(mean0 - 1.5) < 5 * 0.5 / math.sqrt(n)  # within 5 standard errors (a fair 1-or-2 coin: sd 0.5)
    # The default, one stratum over the model (whatever the layout): 4 of 8 kept, 4 x 3/8 = 1.5 on stage 0.
    default = _cfg(pp=2, schedule="0:1,1,0.5", iters=1,
                   par=dict(decoder_first_pipeline_num_layers=3, decoder_last_pipeline_num_layers=5))
    d_shape = stage_shape(default, build_sampler(default), Stage(0, 1.0, 1.0, 0.5))
    assert d_shape.layers == (1.5, 2.5) and not d_shape.exact


def test_unstratified_gqa_gives_the_expected_kv_heads():
    # 8 query heads in 2 KV groups of 4; p_H 0.5 keeps 4 heads drawn from all 8: both groups are used unless all
    # 4 fall in one group, which happens in 2 of C(8, 4) = 70 draws. Expected KV heads: 2 - 2/70 = 1.9714.
    cfg = _cfg("llama", stratified=False, schedule="0:0.5,1,1", iters=1)
    sampler = build_sampler(cfg)
    shape = stage_shape(cfg, sampler, Stage(0, 0.5, 1.0, 1.0))
    assert shape.n_q == 4 and not shape.exact_kv and shape.n_kv == pytest.approx(2 - 2 / 70)
    # The per-step count varies; over many drawn steps the mean FLOPs approach the closed form.
    n = 1400
    drawn = [step_flops(cfg.model, 1, sampler(i)) for i in range(n)]
    assert len(set(drawn)) > 1
    closed = closed_form_flops(cfg, sampler, n, 1)[0].flops / n
    mean = statistics.fmean(drawn)
    assert abs(mean - closed) < 5 * statistics.stdev(drawn) / math.sqrt(n)  # within 5 standard errors


@pytest.mark.parametrize("p,k", [(0.25, 2), (0.75, 6)])
def test_unstratified_gqa_expectation_by_hand(p, k):
    cfg = _cfg("llama", stratified=False, schedule=f"0:{p},1,1", iters=1)
    shape = stage_shape(cfg, build_sampler(cfg), Stage(0, p, 1.0, 1.0))
    expected = 2 * (1 - math.comb(4, k) / math.comb(8, k))  # 0 when k > 4: both groups always used
    assert shape.n_q == k and shape.n_kv == pytest.approx(expected)
    assert shape.exact_kv == (k > 4)


def test_tinyllama_paper_saving_at_50000_iterations_is_instant(capsys):
    t0 = time.perf_counter()
    total = est_flops_main(["--model-preset", "tinyllama-1.1b", "--est-schedule", "tinyllama-paper",
                            "--train-iters", "50000"])
    assert time.perf_counter() - t0 < 2.0
    assert f"{100 * total:.2f}" == "25.01"
    assert "25.01% saved" in capsys.readouterr().out


def test_closed_form_matches_drawing_for_tinyllama_over_a_short_schedule():
    cfg = Config(model=model_preset("tinyllama-1.1b"), est=ESTConfig(schedule="tinyllama-paper"),
                 train=TrainConfig(train_iters=300))
    drawn = schedule_flops(cfg.model, build_sampler(cfg), 300, 2048)
    closed = closed_form_flops(cfg, build_sampler(cfg), 300, 2048)
    assert closed == drawn and saving(closed) == saving(drawn)


@pytest.mark.parametrize("argv,flag", [
    (["--model-preset", "tinyllama-1.1b", "--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3"),
    (["--model-preset", "gpt2-124m", "--pipeline-model-parallel-size", "5"], "--pipeline-model-parallel-size 5"),
    (["--model-preset", "gpt2-124m", "--world-size", "6", "--tensor-model-parallel-size", "4"], "world size 6"),
])
def test_flops_tool_refuses_what_training_refuses(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        est_flops_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and flag in err[0]
