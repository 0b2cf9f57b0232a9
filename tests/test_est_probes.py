"""Issue 17's method probes: --est-keep-end-layers, --est-lr-rewarm-iters and smooth ('smooth:...') schedules."""
import ast
import dataclasses
import math
import os
import time

import pytest
import torch

from megatron_est.config import Config, ConfigError, ESTConfig, ModelConfig, ParallelConfig, TrainConfig
from megatron_est.est.build import build_sampler
from megatron_est.est.checks import check_est
from megatron_est.est.rewarm import rewarm_factor
from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges
from megatron_est.est.savings import saving, schedule_flops
from megatron_est.est.schedule import Schedule, Stage, parse_schedule
from megatron_est.est.stage_flops import closed_form_flops, stage_shape
from megatron_est.training.optimizer import learning_rate
from tests.helpers import ROOT, tiny
from tools.est_flops import main as est_flops_main

MHA = ModelConfig(family="gpt2", num_layers=8, hidden_size=128, num_attention_heads=8, ffn_hidden_size=64)


def _sampler(rates=(0.5, 0.5, 0.5), strata=2, keep_ends=False, stratified=True, seed=3, model=MHA):
    kw = {"keep_end_layers": True} if keep_ends else {}  # off: built exactly as before the flag existed
    return SubnetworkSampler(model, Schedule((Stage(0, *rates),)), seed,
                             Strata(1, 1, even_ranges(model.num_layers, strata)), stratified, **kw)


def _cfg(schedule="0:0.5,0.5,0.5;10:1,1,1", iters=20, keep_ends=True, stratified=True, pp=1, par=None,
         num_layers=8, **est):
    return Config(model=tiny("gpt2", num_layers=num_layers),
                  parallel=ParallelConfig(pipeline_model_parallel_size=pp, **(par or {})),
                  est=ESTConfig(schedule=schedule, keep_end_layers=keep_ends, stratified=stratified, **est),
                  train=TrainConfig(train_iters=iters))


# ------------------------------------------------------------------------------------------ --est-keep-end-layers

def test_end_layers_always_kept_and_every_stratum_keeps_its_count():
    s = _sampler(keep_ends=True)  # 8 layers in strata [0, 4) and [4, 8), p_L 0.5: 2 kept in each
    seen = set()
    for it in range(300):
        layers = s(it).layers
        assert 0 in layers and 7 in layers
        assert sum(i < 4 for i in layers) == 2 and sum(i >= 4 for i in layers) == 2
        seen.update(layers)
    assert seen == set(range(8))  # the middle layers are still drawn, each of them sometimes


def test_unstratified_keeps_the_ends_and_draws_the_rest_uniformly():
    s = _sampler(rates=(1, 1, 0.5), keep_ends=True, stratified=False)  # k = 4 of 8: the 2 ends + 2 of 6
    counts = torch.zeros(8)
    for it in range(1200):
        layers = s(it).layers
        assert len(layers) == 4 and {0, 7} <= set(layers)
        counts[list(layers)] += 1
    middle = counts[1:7] / 1200
    assert torch.allclose(middle, torch.full((6,), 2 / 6), atol=0.05)  # each middle layer in 1/3 of the steps


def test_keep_ends_sampler_is_a_pure_function_of_seed_and_iteration():
    a, b = _sampler(keep_ends=True), _sampler(keep_ends=True)
    torch.manual_seed(0)
    first = [a(it).layers for it in range(30)]
    torch.manual_seed(99)  # the global RNG plays no part
    assert [b(it).layers for it in reversed(range(30))][::-1] == first
    assert [_sampler(keep_ends=True, seed=4)(it).layers for it in range(30)] != first


def _old_layer_draw(seed, iteration, ranges, k):
    """The layer draw as written before --est-keep-end-layers (independent reference): the sampler's generator
    seed mix, then keep k of each stratum by one randperm."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + iteration * 7_919 + 0x5EED) % (2 ** 63 - 1))
    return tuple(sorted(i for a, b in ranges for i in (torch.randperm(b - a, generator=g)[:k] + a).tolist()))


def test_flag_off_draws_are_bit_identical_to_before():
    off = _sampler(keep_ends=False)
    explicit = SubnetworkSampler(MHA, off.schedule, 3, off.strata, True, False, False)
    for it in range(40):
        sub, ref = off(it), explicit(it)
        assert sub.layers == _old_layer_draw(3, it, [(0, 4), (4, 8)], 2)
        assert sub.layers == ref.layers
        assert all(torch.equal(x, y) for x, y in zip(sub.heads + sub.neurons, ref.heads + ref.neurons))


def test_refuses_a_stratum_that_cannot_keep_both_end_layers():
    # 4 layers in one stratum at p_L 0.25 keep 1 layer, but layers 0 and 3 are both forced
    cfg = _cfg("0:0.5,0.5,0.25;10:1,1,1", num_layers=4)
    with pytest.raises(ConfigError, match=r"^--est-keep-end-layers: layers 0-3 keep 1 of 4 at p_L 0.25, fewer "
                                          r"than the 2 end layers \[0, 3\]"):
        check_est(cfg)
    check_est(dataclasses.replace(cfg, est=dataclasses.replace(cfg.est, pp_strata=2)))  # 1 of 2 each: fine
    check_est(_cfg("0:0.5,0.5,0.5;10:1,1,1", num_layers=4))  # 2 of 4: exactly the two ends


@pytest.mark.parametrize("stratified,pp", [(True, 1), (True, 2), (False, 1)])
def test_closed_form_flops_stay_exact_with_keep_ends(stratified, pp):
    cfg = _cfg("0:0.5,0.5,0.5;5:0.5,0.25,0.75;12:1,1,1", stratified=stratified, pp=pp)
    tokens = 2 * cfg.model.seq_length
    drawn = schedule_flops(cfg.model, build_sampler(cfg), cfg.train.train_iters, tokens)
    assert closed_form_flops(cfg, build_sampler(cfg), cfg.train.train_iters, tokens) == drawn


def test_unstratified_per_pipeline_stage_expectation_counts_the_forced_layers():
    # 10 layers on stages [0,2) [2,6) [6,10); p_L 0.5 keeps k = 5: layers 0 and 9 plus 3 of the 8 others, so
    # stage 1 expects 1 + 3 * 1/8, stage 2 3 * 4/8, stage 3 1 + 3 * 3/8
    cfg = _cfg("0:1,1,0.5", iters=4, stratified=False, pp=3, num_layers=10,
               par=dict(decoder_first_pipeline_num_layers=2, decoder_last_pipeline_num_layers=4))
    sampler = build_sampler(cfg)
    assert stage_shape(cfg, sampler, sampler.schedule.stages[0]).layers == (1.375, 1.5, 2.125)
    draws = [sampler(it).layers for it in range(2000)]
    mean = [sum(sum(a <= i < b for i in d) for d in draws) / 2000 for a, b in ((0, 2), (2, 6), (6, 10))]
    assert mean == pytest.approx([1.375, 1.5, 2.125], abs=0.05)


# ------------------------------------------------------------------------------------------ --est-lr-rewarm-iters

def test_rewarm_factor_by_hand():
    # N = 4: (k + 1) / 5 for k = 0..3 iterations after the switch at 100, then 1; stage 0 is never re-warmed
    assert [rewarm_factor(4, 1, 100, i) for i in range(100, 106)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert rewarm_factor(4, 0, 0, 2) == 1.0 and rewarm_factor(0, 2, 100, 100) == 1.0


def _recorded_lrs(monkeypatch, rewarm):
    """The learning rate the plain engine sets on its optimizer at every step of a tiny 8-iteration run whose
    EST stages start at iterations 0, 3 and 6."""
    import megatron_est.training.engine as engine_mod
    from tests.engine_harness import make_cfg, parallel_state, run_plain

    seen = []
    real = engine_mod.set_lr
    monkeypatch.setattr(engine_mod, "set_lr", lambda opt, lr: (seen.append(lr), real(opt, lr)))
    cfg = make_cfg(iters=8)
    cfg = dataclasses.replace(cfg, est=dataclasses.replace(cfg.est, lr_rewarm_iters=rewarm))
    out = run_plain(cfg, parallel_state(0, 1, cfg))
    assert [r["lr"] for r in out["records"]] == seen  # the log records what the optimizer got
    return seen


def _base_lr(i):
    # make_cfg: lr 3e-3, min 3e-4, 2 warmup iterations, cosine decay to iteration 8
    return 3e-3 * (i + 1) / 2 if i < 2 else 3e-4 + 0.5 * (1 + math.cos(math.pi * (i - 2) / 6)) * 2.7e-3


def test_plain_engine_lrs_at_and_around_the_stage_switches(monkeypatch):
    factors = [1, 1, 1, 1 / 3, 2 / 3, 1, 1 / 3, 2 / 3]  # N = 2, switches at 3 and 6
    assert _recorded_lrs(monkeypatch, 2) == pytest.approx([_base_lr(i) * f for i, f in enumerate(factors)],
                                                          rel=1e-12)


def test_rewarm_off_gives_exactly_the_old_lrs(monkeypatch):
    tr = TrainConfig(micro_batch_size=2, global_batch_size=8, train_iters=8, lr=3e-3, min_lr=3e-4, lr_warmup_iters=2)
    assert _recorded_lrs(monkeypatch, 0) == [learning_rate(tr, i) for i in range(8)]


def _calls(path: str) -> set[str]:
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    return {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
            for n in ast.walk(tree) if isinstance(n, ast.Call)}


def test_both_engines_set_the_one_step_lr():
    # DeepSpeed is not needed for this: both engines call training/optimizer.step_lr and nothing else sets an LR
    for path in ("megatron_est/training/engine.py", "megatron_est/training/deepspeed_engine.py"):
        calls = _calls(path)
        assert "step_lr" in calls and "learning_rate" not in calls, path


def test_rewarm_refused_with_a_smooth_schedule():
    with pytest.raises(ConfigError, match="^--est-lr-rewarm-iters needs a staged --est-schedule"):
        check_est(_cfg("smooth:0:0.5,0.5,0.5;10:1,1,1", keep_ends=False, lr_rewarm_iters=5))


# ------------------------------------------------------------------------------------------ smooth schedules

def _rates(schedule, it):
    st = schedule.stage_at(it)
    return st.p_heads, st.p_mlp, st.p_layers


def test_smooth_rates_are_the_linear_interpolation():
    s = parse_schedule("smooth:0:0.5,1,0.5;4:1,0.5,0.5;8:1,1,1", 12)
    assert _rates(s, 0) == (0.5, 1, 0.5)
    assert _rates(s, 1) == (0.625, 0.875, 0.5)
    assert _rates(s, 2) == (0.75, 0.75, 0.5)
    assert _rates(s, 4) == (1, 0.5, 0.5)
    assert _rates(s, 6) == (1, 0.75, 0.75)
    assert _rates(s, 7) == (1, 0.875, 0.875)
    assert _rates(s, 8) == _rates(s, 11) == (1, 1, 1)
    assert [st.start for st in s.stages] == list(range(9))


def test_smooth_percent_points_and_merged_equal_rates():
    s = parse_schedule("smooth:0%:0.5,0.5,0.5;20%:0.5,0.5,0.5;40%:1,1,1", 20)  # points at 0, 4, 8
    assert [st.start for st in s.stages] == [0, 5, 6, 7, 8]  # 0..4 keep 0.5: one stage
    assert _rates(s, 5) == (0.625,) * 3 and _rates(s, 3) == (0.5,) * 3


def test_ordinary_specs_parse_exactly_as_before():
    assert parse_schedule("0%:0.5,0.5,0.5;25%:0.5,0.5,1;50%:1,1,1", 2400).stages == (
        Stage(0, 0.5, 0.5, 0.5), Stage(600, 0.5, 0.5, 1.0), Stage(1200, 1.0, 1.0, 1.0))
    assert parse_schedule("default", 100).stages == (Stage(0, 0.5, 0.5, 0.5), Stage(20, 0.5, 0.5, 1.0),
                                                     Stage(40, 1.0, 1.0, 1.0))
    assert parse_schedule("0:0.5,1,1;7:1,1,1", 5).stage_index(6) == 0
    assert parse_schedule("0:0.5,1,1;7:1,1,1", 5).stage_index(7) == 1
    with pytest.raises(ConfigError, match=r"stage starts must increase strictly, got \[0, 5, 5\]"):
        parse_schedule("0:0.5,1,1;5:1,1,1;5:1,1,1", 10)


def test_stage_index_is_cheap_for_a_long_smooth_schedule():
    s = parse_schedule("smooth:0:0.5,0.5,0.5;14400:1,1,1", 14400)
    assert len(s.stages) == 14400
    t0 = time.perf_counter()
    idx = [s.stage_index(i) for i in range(14400)]
    assert time.perf_counter() - t0 < 1.0
    assert idx == list(range(14400))
    assert s.stage_index(10 ** 6) == 14399


def test_flops_tool_saving_for_a_smooth_schedule_equals_drawing_every_step(capsys):
    spec, iters = "smooth:0:0.5,0.5,0.5;30:1,1,1", 40
    argv = ["--model-preset", "gpt2-124m", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--vocab-size", "256", "--train-iters", str(iters), "--micro-batch-size", "2",
            "--est-schedule", spec]
    got = est_flops_main(argv)
    printed = capsys.readouterr().out
    m = ModelConfig(family="gpt2", num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32,
                    vocab_size=256)
    sampler = SubnetworkSampler(m, parse_schedule(spec, iters), 1234, Strata(1, 1, even_ranges(4, 1)))
    drawn = saving(schedule_flops(m, sampler, iters, 2 * 32))  # an independent count: every step drawn
    assert got == pytest.approx(drawn, rel=1e-12)
    assert f"{100 * drawn:.2f}% saved" in printed
    assert len(printed.splitlines()) < 12  # one row per run of equal head and layer counts, not one per stage


def test_target_saving_fits_a_smooth_schedule_quickly():
    cfg = _cfg("smooth:0:0.5,0.5,0.5;1500:1,1,1", iters=2400, keep_ends=False, target_saving=0.2)
    t0 = time.perf_counter()
    sampler = build_sampler(cfg)
    assert time.perf_counter() - t0 < 10
    tokens = cfg.model.seq_length
    got = saving(closed_form_flops(cfg, sampler, 2400, tokens))
    assert abs(got - 0.2) <= 0.005



def _rewarm_cfg(rewarm: int, **engine):
    from tests.engine_harness import make_cfg

    c = make_cfg(unsampled="freeze", engine=engine or None)
    return dataclasses.replace(c, est=dataclasses.replace(c.est, lr_rewarm_iters=rewarm))


def _deepspeed_rewarm_worker(rank, world):
    from megatron_est.parallel.state import ParallelState, build_groups
    from tests.engine_harness import run_deepspeed

    return run_deepspeed(_rewarm_cfg(2, deepspeed=True, zero_stage=1), build_groups(ParallelState()))["losses"]


@pytest.mark.slow  # DeepSpeed start-up: about 20 s
def test_deepspeed_rewarm_trains_like_the_plain_engine():
    """The re-warmed LR reaches DeepSpeed's optimizer as it reaches torch's: ZeRO-1 with --est-lr-rewarm-iters
    gives the plain engine's loss curve; without the re-warm the curve differs (the check can fail)."""
    pytest.importorskip("deepspeed")
    from megatron_est.parallel.state import ParallelState
    from tests.engine_harness import run_plain
    from tests.helpers import run_distributed

    ds = run_distributed(_deepspeed_rewarm_worker, 1)[0]
    plain = run_plain(_rewarm_cfg(2), ParallelState())["losses"]
    plain_off = run_plain(_rewarm_cfg(0), ParallelState())["losses"]
    assert all(abs(ds[i] - plain[i]) <= 1e-5 * abs(plain[i]) for i in plain)
    assert max(abs(plain_off[i] - plain[i]) for i in plain) > 1e-3
