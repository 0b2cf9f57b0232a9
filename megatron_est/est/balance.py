"""What sampling costs the busiest pipeline stage and TP shard of a layout, and the most either must hold.

The strata are sampling parameters, not the layout (est/build.py): the same flags draw the same subnetworks at
every TP, PP and stage split. A stratum that crosses a TP shard or pipeline stage boundary gives the shards or
stages on either side kept counts that vary from step to step; the pipeline waits for its busiest stage, and in
each layer the TP all-reduces after attention and after the MLP wait for the busiest shard. So:

  - `worst_shape`: the most a step keeps in practice on each pipeline stage (layers) and on one TP shard
    (heads, KV heads, neurons), in closed form: what memory must be planned for. Equal to the stage's own
    counts when every stratum lies inside one shard and one stage (`aligned`).
  - `slowdown`: the busiest stage's FLOPs per TP rank (each layer at its busiest shard, attention and MLP
    apart), averaged over steps the sampler really draws, divided by the same with every count at its
    expectation shared evenly: the factor by which imbalance stretches a step. 1.0 exactly when aligned.
  - `balancing_strata`: the fewest strata that line up with this layout (the hint the dry run prints).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from megatron_est.config import Config
from megatron_est.flops_rule import head_forward_flops_per_token, layer_forward_flops_per_token
from megatron_est.parallel.partition import stage_ranges
from megatron_est.est.build import strata
from megatron_est.est.sampler import Subnetwork, SubnetworkSampler
from megatron_est.est.schedule import Schedule, Stage
from megatron_est.est.stage_flops import StageShape, pipeline_stage_flops, range_overlaps, stage_shape

DRAWS = 64  # sampled steps behind `slowdown`; its standard error is well under 1% at the shapes we ship


def _most_in(ranges: list[tuple[int, int]], p: float, lo: int, hi: int, forced: tuple[int, ...] = ()) -> int:
    """How many units of [lo, hi) a step keeps, at most in practice. Each range keeps its forced units and
    keep_count(p, size) - forced of its others uniformly, so the count in [lo, hi) is a sum of hypergeometric
    draws: bounded by six standard deviations above its mean (about one draw in 10^9 goes past; normal
    approximation), and never more than one draw can keep (which the bound reaches for a few layers or heads,
    not for thousands of neurons)."""
    most = mean = var = 0.0
    for here, n, total, k in range_overlaps(ranges, p, lo, hi, forced):
        most += here + min(n, k)
        mean += here + n * k / max(1, total)
        var += n * (k / total) * (1 - k / total) * (total - n) / (total - 1) if total > 1 else 0.0
    return int(min(most, math.ceil(mean + 6 * math.sqrt(var) - 1e-9)))


def _shards(n: int, tp: int) -> list[tuple[int, int]]:
    return [(t * n // tp, (t + 1) * n // tp) for t in range(tp)]


def crossed(cfg: Config) -> tuple[bool, bool]:
    """(some head or neuron stratum crosses a TP shard boundary, some layer stratum crosses a stage boundary)."""
    tp, m = cfg.parallel.tensor_model_parallel_size, cfg.model
    ranges = SubnetworkSampler(m, Schedule((Stage(0, 1.0, 1.0, 1.0),)), 0, strata(cfg), cfg.est.stratified)

    def inside(units: list[tuple[int, int]], parts: list[tuple[int, int]]) -> bool:
        return all(any(a <= s and e <= b for a, b in parts) for s, e in units)

    shards = (inside(ranges.head_ranges(), _shards(m.num_attention_heads, tp))
              and inside(ranges.neuron_ranges(), _shards(m.ffn_hidden_size, tp)))
    return not shards, not inside(ranges.layer_ranges(), stage_ranges(cfg))


def aligned(cfg: Config) -> bool:
    """Every stratum lies inside one TP shard (heads, neurons) and one pipeline stage (layers)."""
    return not any(crossed(cfg))


def what_crosses(cfg: Config) -> str:
    """Which strata cross which boundaries, and what varies because of it."""
    par, est = cfg.parallel, cfg.est
    tp, pp = crossed(cfg)
    return " and ".join(([f"--est-tp-strata {est.tp_strata} crosses the {par.tensor_model_parallel_size} TP shards' "
                          "boundaries (kept heads and neurons per shard vary from step to step)"] if tp else [])
                        + ([f"--est-pp-strata {est.pp_strata} crosses the {par.pipeline_model_parallel_size} "
                            "pipeline stages' boundaries (kept layers per stage vary)"] if pp else []))


def balance_note(cfg: Config, schedule: Schedule) -> Optional[str]:
    """One line for a layout whose shards or stages the strata do not line up with (None when they do, or when
    nothing is sampled)."""
    if all(st.is_full for st in schedule.stages) or aligned(cfg):
        return None
    return (f"note: EST sampling: {what_crosses(cfg)}; the busiest sets the pace (--dry-run prints "
            f"the cost); {balancing_hint(cfg)}")


def balancing_hint(cfg: Config) -> str:
    """The strata flags that would line this layout up, and what choosing them means."""
    tp, pp = balancing_strata(cfg)
    cross_tp, cross_pp = crossed(cfg)
    wanted = [("tp", tp, cross_tp, "TP shards"), ("pp", pp, cross_pp, "pipeline stages")]
    flags = " ".join(f"--est-{d}-strata {n}" for d, n, cross, _ in wanted if cross and n is not None)
    missing = [what for _, n, cross, what in wanted if cross and n is None]
    out = (f"{flags} would line the strata up with this layout (balanced work, but other subnetworks: give the "
           "same values in every layout the run moves to)") if flags else ""
    if missing:
        out += ("; " if out else "") + f"no strata of 2 or more units line up with its {' or '.join(missing)}"
    return out


def worst_shape(cfg: Config, sampler: SubnetworkSampler, stage: Stage) -> StageShape:
    """The stage's shape with the most a step keeps (`_most_in`): layers per pipeline stage, and TP x the busiest
    shard's heads, KV heads and neurons (memory divides these by TP)."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    shape = stage_shape(cfg, sampler, stage)
    heads, groups, neurons = m.num_attention_heads // tp, m.num_query_groups // tp, m.ffn_hidden_size // tp
    if stage.p_heads < 1.0:
        heads = max(_most_in(sampler.head_ranges(), stage.p_heads, a, b)
                    for a, b in _shards(m.num_attention_heads, tp))
        # MHA: a KV head per query head; GQA: at most every local group (stratified GQA keeps >= 1 in each)
        groups = heads if m.queries_per_group == 1 else min(groups, heads)
    if stage.p_mlp < 1.0:
        neurons = max(_most_in(sampler.neuron_ranges(), stage.p_mlp, a, b)
                      for a, b in _shards(m.ffn_hidden_size, tp))
    if stage.p_layers < 1.0:
        layers = tuple(float(_most_in(sampler.layer_ranges(), stage.p_layers, a, b, sampler.forced_layers()))
                       for a, b in stage_ranges(cfg))
    else:
        layers = shape.layers
    return StageShape(heads * tp, groups * tp, neurons * tp, layers, True, True)


def _shard_counts(kept: Optional[torch.Tensor], n: int, tp: int, per_group: int = 1) -> list[int]:
    """Kept units (or KV groups they touch, per_group > 1) on each of tp shards of n units."""
    if kept is None:
        return [n // tp // per_group] * tp
    shard = kept // (n // tp)
    if per_group == 1:
        return torch.bincount(shard, minlength=tp).tolist()
    return torch.bincount(torch.unique(kept // per_group) // (n // tp // per_group), minlength=tp).tolist()


def _busiest_stage_flops(cfg: Config, sub: Subnetwork, stages: list[tuple[int, int]], tp: int) -> float:
    """Forward FLOPs per token of the busiest pipeline stage for one drawn step, each layer's attention and MLP
    at its busiest TP shard, the vocabulary-parallel LM head shared evenly."""
    m = cfg.model
    kept = set(sub.layers)
    per_stage = []
    for lo, hi in stages:
        total = 0.0
        for i in range(lo, hi):
            if i not in kept:
                continue
            q = _shard_counts(sub.heads[i], m.num_attention_heads, tp)
            kv = q if m.queries_per_group == 1 else _shard_counts(sub.heads[i], m.num_attention_heads, tp,
                                                                  m.queries_per_group)
            f = _shard_counts(sub.neurons[i], m.ffn_hidden_size, tp)
            total += max(layer_forward_flops_per_token(m, a, b, 0) for a, b in zip(q, kv))
            total += max(f) * layer_forward_flops_per_token(m, 0, 0, 1)
        per_stage.append(total)
    per_stage[-1] += head_forward_flops_per_token(m) / tp
    return max(per_stage)


def slowdown(cfg: Config, sampler: SubnetworkSampler, stage: Stage, draws: int = DRAWS) -> float:
    """E[busiest stage's FLOPs per TP rank] over drawn steps / the busiest stage's expected FLOPs per TP rank."""
    if stage.is_full or aligned(cfg):
        return 1.0
    tp = cfg.parallel.tensor_model_parallel_size
    expected = max(pipeline_stage_flops(cfg, stage_shape(cfg, sampler, stage), 1)) / 3 / tp
    one = SubnetworkSampler(sampler.model, Schedule((dataclasses.replace(stage, start=0),)), sampler.seed,
                            sampler.strata, sampler.stratified, sampler.layer_rescale, sampler.keep_end_layers)
    stages = stage_ranges(cfg)
    drawn = [_busiest_stage_flops(cfg, one(it), stages, tp) for it in range(draws)]
    # The mean of a maximum is never below the maximum of the means; a draw average under it is noise.
    return max(1.0, sum(drawn) / draws / expected)


def balancing_strata(cfg: Config) -> tuple[Optional[int], Optional[int]]:
    """(--est-tp-strata, --est-pp-strata): the fewest strata that line up with this layout's TP shards and
    pipeline stages (the TP size; the layers over the largest range size dividing every stage boundary), or None
    where lining up would leave strata of one unit, which sampling cannot thin."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    # --est-tp-strata splits the neurons, and the heads too unless grouped queries stratify by KV group
    smallest = m.ffn_hidden_size if m.queries_per_group > 1 else min(m.ffn_hidden_size, m.num_attention_heads)
    size = m.num_layers
    for a, _ in stage_ranges(cfg):
        size = math.gcd(size, a)
    return (tp if smallest // tp >= 2 else None), (m.num_layers // size if size >= 2 else None)
