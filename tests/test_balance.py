"""est/balance.py: what strata that cross TP shards or pipeline stages cost, against hand-computed values and the
counts that drawn steps really keep."""
from __future__ import annotations

import pytest

from megatron_est.config import Config, ESTConfig, ParallelConfig, TrainConfig
from megatron_est.est.balance import aligned, balancing_strata, slowdown, worst_shape
from megatron_est.est.build import build_sampler
from megatron_est.est.schedule import Stage
from megatron_est.flops_rule import head_forward_flops_per_token, layer_forward_flops_per_token
from megatron_est.parallel.partition import stage_ranges
from megatron_est.validation import validate
from tests.helpers import tiny


def _cfg(tp=1, pp=1, tp_strata=1, pp_strata=1, first=None, last=None, schedule="0:0.5,0.5,0.5", **model):
    m = tiny("gpt2", **{"num_layers": 8, **model})
    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         decoder_first_pipeline_num_layers=first, decoder_last_pipeline_num_layers=last)
    return Config(model=m, parallel=par, est=ESTConfig(schedule=schedule, tp_strata=tp_strata, pp_strata=pp_strata),
                  train=TrainConfig(train_iters=100, micro_batch_size=1))


def test_aligned_strata_cost_nothing_and_hold_the_exact_counts():
    cfg = _cfg(tp=2, pp=2, tp_strata=2, pp_strata=2)
    sampler, stage = build_sampler(cfg), Stage(0, 0.5, 0.5, 0.5)
    assert aligned(cfg) and slowdown(cfg, sampler, stage) == 1.0
    most = worst_shape(cfg, sampler, stage)
    assert (most.n_q, most.n_neurons, most.layers) == (4, 128, (2.0, 2.0))  # 2 of 4 heads, 64 of 128 per shard


def test_one_stratum_is_not_aligned_with_tp_or_pp():
    assert aligned(_cfg())
    assert not aligned(_cfg(tp=2)) and not aligned(_cfg(pp=2)) and aligned(_cfg(pp=2, pp_strata=4))


def test_busiest_shard_by_hand():
    # 2 heads on 2 TP shards, p_H 0.5: every step keeps one head, so one shard runs a whole head and the other
    # none, every time. Per TP rank the busiest shard's layer costs attn(1 head) + MLP / 2 against the even
    # share attn(1 head) / 2 + MLP / 2; the LM head is shared evenly.
    cfg = _cfg(tp=2, num_attention_heads=2, schedule="0:0.5,1,1")
    m = cfg.model
    attn, mlp = layer_forward_flops_per_token(m, 1, 1, 0), layer_forward_flops_per_token(m, 0, 0, m.ffn_hidden_size)
    head = head_forward_flops_per_token(m)
    expect = (8 * (attn + mlp / 2) + head / 2) / (8 * (attn / 2 + mlp / 2) + head / 2)
    assert slowdown(cfg, build_sampler(cfg), Stage(0, 0.5, 1.0, 1.0)) == pytest.approx(expect, rel=1e-12)
    assert worst_shape(cfg, build_sampler(cfg), Stage(0, 0.5, 1.0, 1.0)).n_q == 2  # TP x the busiest shard's 1


def test_crossing_layers_slow_the_pipeline_down():
    cfg = _cfg(pp=2, schedule="0:1,1,0.5")
    assert slowdown(cfg, build_sampler(cfg), Stage(0, 1.0, 1.0, 0.5)) > 1.05


def test_worst_counts_bound_every_drawn_step():
    # Layers: 4 of 8 over a 3 + 5 split: stage 0 can hold 3 (all its layers), stage 1 all 4. Neurons: 512 of
    # 1024 over 2 shards: mean 256 per shard, hypergeometric sd sqrt(512 x 1/4 x 512/1023) = 8.004, so the
    # bound is ceil(256 + 6 x 8.004) = 305, not the 512 one draw could in principle keep.
    cfg = _cfg(tp=2, pp=2, first=3, last=5, ffn_hidden_size=1024)
    sampler, stage = build_sampler(cfg), Stage(0, 0.5, 0.5, 0.5)
    most = worst_shape(cfg, sampler, stage)
    assert most.layers == (3.0, 4.0) and most.n_neurons == 2 * 305 and most.n_q == 2 * 4
    stages = stage_ranges(cfg)
    seen_layers, seen_neurons = [0, 0], 0
    for it in range(500):
        sub = sampler(it)
        for s, (a, b) in enumerate(stages):
            seen_layers[s] = max(seen_layers[s], sum(a <= i < b for i in sub.layers))
        on_0 = [int((n < 512).sum()) for n in sub.neurons]  # the other shard keeps the rest of the 512
        seen_neurons = max(seen_neurons, *(max(c, 512 - c) for c in on_0))
    assert seen_layers == [3, 4]  # reached: few layers, so the bound is what steps really do
    assert 256 < seen_neurons <= 305


@pytest.mark.parametrize("pp,first,last,expect", [(2, None, None, 2), (4, None, None, 4), (2, 2, 6, 4),
                                                  (2, 3, 5, None)])
def test_balancing_strata(pp, first, last, expect):
    cfg = _cfg(tp=2, pp=pp, first=first, last=last)
    assert balancing_strata(cfg) == (2, expect)
    if expect is not None:
        lined_up = _cfg(tp=2, pp=pp, first=first, last=last, tp_strata=2, pp_strata=expect)
        assert aligned(lined_up)


def test_training_logs_the_hint_once_and_not_when_lined_up():
    notes = validate(_cfg(tp=2, pp=2), 4).notes
    hint = [n for n in notes if n.startswith("note: EST sampling: --est-tp-strata 1 crosses the 2 TP shards'")]
    assert len(hint) == 1 and "--est-pp-strata 1 crosses the 2 pipeline stages'" in hint[0]
    assert "--est-tp-strata 2 --est-pp-strata 2 would line the strata up" in hint[0]
    only_tp = [n for n in validate(_cfg(tp=2), 2).notes if "EST sampling" in n]
    assert len(only_tp) == 1 and "pipeline" not in only_tp[0] and "--est-tp-strata 2 would line" in only_tp[0]
    uneven = [n for n in validate(_cfg(pp=2, first=3, last=5), 2).notes if "EST sampling" in n][0]
    assert uneven.endswith("no strata of 2 or more units line up with its pipeline stages")
    assert not any("EST strata" in n for n in validate(_cfg(tp=2, pp=2, tp_strata=2, pp_strata=2), 4).notes)
    assert not any("EST strata" in n for n in validate(_cfg(tp=2, pp=2, schedule="none"), 4).notes)
