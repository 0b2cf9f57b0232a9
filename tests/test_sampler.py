"""The EST sampler: pure function of (seed, iteration), identical on every rank, stratified, unbiased."""
import pytest
import torch

from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges, keep_count
from megatron_est.est.schedule import Schedule, Stage, parse_schedule
from megatron_est.config import ConfigError, ModelConfig
from tests.helpers import run_distributed


def _sampler(cfg, rates=(0.5, 0.5, 0.5), tp=2, pp=2, stratified=True, seed=0):
    strata = Strata(tp, tp, even_ranges(cfg.num_layers, pp))
    return SubnetworkSampler(cfg, Schedule((Stage(0, *rates),)), seed, strata, stratified)


MHA = ModelConfig(family="gpt2", num_layers=8, hidden_size=128, num_attention_heads=8, ffn_hidden_size=64)
GQA = ModelConfig(family="llama", num_layers=8, hidden_size=128, num_attention_heads=8, num_query_groups=2,
                  ffn_hidden_size=64)


def _as_lists(sub):
    return (sub.layers, [None if h is None else h.tolist() for h in sub.heads],
            [None if n is None else n.tolist() for n in sub.neurons])


def _draw_on_rank(rank, world):
    torch.manual_seed(1000 + rank)  # different global RNG state on every rank must not matter
    return [_as_lists(_sampler(GQA)(it)) for it in range(20)]


def test_identical_subnetworks_on_every_rank():
    a, b = run_distributed(_draw_on_rank, 2)
    assert a == b
    assert a == [_as_lists(_sampler(GQA)(it)) for it in range(20)]


def test_pure_function_of_seed_and_iteration_and_leaves_global_rng_alone():
    s = _sampler(MHA)
    state = torch.get_rng_state()
    first = _as_lists(s(3))
    assert torch.equal(state, torch.get_rng_state())
    assert _as_lists(s(4)) != first
    assert _as_lists(_sampler(MHA)(3)) == first
    assert _as_lists(_sampler(MHA, seed=1)(3)) != first


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_equal_kept_counts_per_shard_and_stage(tp):
    s = _sampler(MHA, rates=(0.5, 0.25, 0.5), tp=tp, pp=2)
    for it in range(50):
        sub = s(it)
        per_stage = [sum(lo <= i < hi for i in sub.layers) for lo, hi in even_ranges(8, 2)]
        assert per_stage == [2, 2]
        for i in range(8):
            heads = torch.bincount(sub.heads[i] // (8 // tp), minlength=tp)
            assert heads.tolist() == [keep_count(0.5, 8 // tp)] * tp
            neurons = torch.bincount(sub.neurons[i] // (64 // tp), minlength=tp)
            assert neurons.tolist() == [keep_count(0.25, 64 // tp)] * tp


def test_equal_query_heads_per_kv_group():
    s = _sampler(GQA, rates=(0.5, 0.5, 1.0), tp=1, pp=1)
    for it in range(50):
        for h in s(it).heads:
            assert torch.bincount(h // 4, minlength=2).tolist() == [2, 2]


@pytest.mark.parametrize("stratified", [True, False])
def test_keep_frequencies_match_rates(stratified):
    n = 3000
    s = _sampler(MHA, rates=(0.5, 0.25, 0.5), tp=2, pp=2, stratified=stratified)
    layer_hits, head_hits, neuron_hits = torch.zeros(8), torch.zeros(8), torch.zeros(64)
    for it in range(n):
        sub = s(it)
        layer_hits[list(sub.layers)] += 1
        head_hits[sub.heads[0]] += 1
        neuron_hits[sub.neurons[0]] += 1
    # Binomial standard error at n=3000 is <= 0.0092; allow 5 of them.
    for hits, p in ((layer_hits, 0.5), (head_hits, 0.5), (neuron_hits, 0.25)):
        freq = hits / n
        assert (freq - p).abs().max() < 0.046, (freq, p)


def test_unstratified_can_skip_a_whole_stage():
    s = _sampler(MHA, rates=(1.0, 1.0, 0.25), tp=1, pp=2, stratified=False)
    assert any(all(i >= 4 for i in s(it).layers) or all(i < 4 for i in s(it).layers) for it in range(200))


def test_keep_count_rounds_half_up_and_keeps_one():
    assert keep_count(0.5, 3) == 2 and keep_count(0.5, 5) == 3 and keep_count(0.01, 8) == 1
    assert keep_count(1.0, 7) == 7


def test_schedule_stages_and_spec():
    s = parse_schedule("0:0.5,0.5,0.5;300:0.5,0.5,1;600:1,1,1", 1000)
    assert [s.stage_index(i) for i in (0, 299, 300, 599, 600, 999)] == [0, 0, 1, 1, 2, 2]
    assert s.stage_at(10) == Stage(0, 0.5, 0.5, 0.5)
    p = parse_schedule("default", 100)
    assert [st.start for st in p.stages] == [0, 20, 40]
    assert not parse_schedule("none", 10).enabled
    for bad in ("0:1.5,0.5,0.5", "0:0,1,1", "5:1,1,1", "0:0.5,0.5", "nope", "0:1,1,1;0:1,1,1"):
        with pytest.raises(ConfigError, match="--est-schedule"):
            parse_schedule(bad, 100)


def test_full_stage_is_unsliced():
    sub = SubnetworkSampler(MHA, parse_schedule("none", 10), 0, Strata(1, 1, even_ranges(8, 1)))(0)
    assert sub.is_full and sub.layers == tuple(range(8)) and all(h is None for h in sub.heads)
