"""Closed-form FLOPs of every EST stage: what one step of the stage runs, from keep counts, without drawing.

Every step of a stage keeps the same counts: `keep_count(p, size)` units in each sampling range (est/sampler.py:
heads per head stratum or per KV group, neurons per neuron stratum, layers per layer stratum), so

    step FLOPs = 3 * tokens * (kept layers * layer(n_q, n_kv, n_neurons) + LM head)

with est/flops.py's per-token costs, and a schedule's total is each stage's step FLOPs times its iteration
count: instant for any --train-iters, and equal to drawing every step (tests/test_stage_flops.py).

Two counts are not fixed by the keep counts, and the closed form gives their expectation instead:
  - the KV heads used under --no-est-stratified with grouped queries: k of H query heads drawn uniformly touch
    G * (1 - C(H - r, k) / C(H, k)) of the G groups of r heads on average (a group is unused only when all k
    draws miss its r heads); the per-step count varies between ceil(k / r) and min(G, k);
  - the layers each pipeline stage keeps when a sampling range crosses a stage boundary (--est-pp-strata N:
    N equal strata wherever the stages end, the whole model by default): k of a range's L
    layers drawn uniformly put k * n / L of them in the n it shares with a stage on average (the whole model's
    count is still exact); with --est-keep-end-layers the f end layers of those n are always kept and the other
    k - F (F forced in the range) fall uniformly among its L - F others: f + (k - F) * (n - f) / (L - F).
`StageShape.exact` says whether every step runs exactly the counted FLOPs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from megatron_est.config import Config
from megatron_est.parallel.partition import stage_ranges
from megatron_est.flops_rule import head_forward_flops_per_token, layer_forward_flops_per_token
from megatron_est.est.sampler import SubnetworkSampler, keep_count
from megatron_est.est.savings import StageFlops
from megatron_est.est.schedule import Stage


@dataclass(frozen=True)
class StageShape:
    """What one training step of an EST stage runs, per layer and per pipeline stage."""
    n_q: int  # query heads kept in every kept layer
    n_kv: float  # KV heads computed per kept layer (an expectation when exact_kv is False)
    n_neurons: int  # MLP neurons kept in every kept layer
    layers: tuple[float, ...]  # kept layers on each pipeline stage (expectations when exact_layers is False)
    exact_kv: bool
    exact_layers: bool

    @property
    def exact(self) -> bool:
        """Every step of the stage runs exactly these counts (so the whole-model step FLOPs are exact too,
        whenever exact_kv holds: the model's total kept layers are always a fixed count)."""
        return self.exact_kv and self.exact_layers


def _kept(ranges: list[tuple[int, int]], p: float) -> int:
    return sum(keep_count(p, end - start) for start, end in ranges)


def _kv_heads(cfg: Config, sampler: SubnetworkSampler, n_q: int, p_heads: float) -> tuple[float, bool]:
    m = cfg.model
    r, groups = m.queries_per_group, m.num_query_groups
    if p_heads >= 1.0 or r == 1:  # all heads, or MHA: one KV head per kept query head
        return float(n_q if r == 1 else groups), True
    if sampler.stratified:  # one range per KV group, each keeps >= 1 query head: every group is used
        return float(groups), True
    h, k = m.num_attention_heads, n_q
    expected = groups * (1.0 - math.comb(h - r, k) / math.comb(h, k))
    return expected, math.ceil(k / r) == min(groups, k)


def range_overlaps(ranges: list[tuple[int, int]], p: float, lo: int, hi: int,
                   forced: tuple[int, ...] = ()) -> Iterator[tuple[int, int, int, int]]:
    """For each sampling range that overlaps [lo, hi): (forced units inside the window, its other units inside
    the window, the range's other units, how many of those a step keeps). A step keeps every forced unit and
    draws the rest uniformly, so the window's count from the range is the first plus a hypergeometric draw."""
    for s, e in ranges:
        a, b = max(lo, s), min(hi, e)
        if a >= b:
            continue
        mine = [i for i in forced if s <= i < e]
        here = sum(a <= i < b for i in mine)
        yield here, b - a - here, e - s - len(mine), keep_count(p, e - s) - len(mine)


def _stage_layers(cfg: Config, sampler: SubnetworkSampler, p_layers: float) -> tuple[tuple[float, ...], bool]:
    """Kept layers per pipeline stage: each sampling range (a stratum, or the whole model unstratified) keeps
    keep_count(p, size) layers, its forced end layers (--est-keep-end-layers) and the rest uniformly among its
    other layers, so a stage holds the expected share of every range it overlaps: all of it, exactly, when the
    range lies inside the stage."""
    stages = stage_ranges(cfg)
    if p_layers >= 1.0:
        return tuple(float(b - a) for a, b in stages), True
    ranges, forced = sampler.layer_ranges(), sampler.forced_layers()

    def expected(a: int, b: int) -> float:
        return sum(here + k * n / max(1, total) for here, n, total, k in range_overlaps(ranges, p_layers, a, b, forced))

    exact = all(keep_count(p_layers, e - s) == e - s or any(a <= s and e <= b for a, b in stages)
                for s, e in ranges)
    return tuple(expected(a, b) for a, b in stages), exact


def stage_shape(cfg: Config, sampler: SubnetworkSampler, stage: Stage) -> StageShape:
    m = cfg.model
    n_q = _kept(sampler.head_ranges(), stage.p_heads) if stage.p_heads < 1.0 else m.num_attention_heads
    n_kv, exact_kv = _kv_heads(cfg, sampler, n_q, stage.p_heads)
    n_neurons = _kept(sampler.neuron_ranges(), stage.p_mlp) if stage.p_mlp < 1.0 else m.ffn_hidden_size
    layers, exact_layers = _stage_layers(cfg, sampler, stage.p_layers)
    if exact_kv:
        n_kv = int(n_kv)
    return StageShape(n_q, n_kv, n_neurons, layers, exact_kv, exact_layers)


def pipeline_stage_flops(cfg: Config, shape: StageShape, tokens: int) -> list[float]:
    """Training FLOPs of one step on each pipeline stage (the LM head on the last): the slowest sets the time."""
    per_layer = layer_forward_flops_per_token(cfg.model, shape.n_q, shape.n_kv, shape.n_neurons)
    out = [3 * tokens * per_layer * n for n in shape.layers]
    out[-1] += 3 * tokens * head_forward_flops_per_token(cfg.model)
    return out


def step_flops_closed(cfg: Config, shape: StageShape, tokens: int) -> float:
    """Training FLOPs of one step of the stage over `tokens` tokens (all ranks): est/flops.step_flops's count."""
    total = sum(pipeline_stage_flops(cfg, shape, tokens))
    return int(round(total)) if shape.exact_kv else total


def stage_iterations(starts: list[int], train_iters: int) -> list[tuple[int, int]]:
    """(first iteration, iteration count) of each stage within [0, train_iters)."""
    ends = starts[1:] + [train_iters]
    return [(min(a, train_iters), max(0, min(b, train_iters) - min(a, train_iters))) for a, b in zip(starts, ends)]


def closed_form_flops(cfg: Config, sampler: SubnetworkSampler, train_iters: int,
                      tokens_per_step: int) -> list[StageFlops]:
    """est/savings.schedule_flops in closed form: the stages that get iterations, with their total FLOPs."""
    schedule = sampler.schedule
    full_shape = stage_shape(cfg, sampler, Stage(0, 1.0, 1.0, 1.0))
    full = step_flops_closed(cfg, full_shape, tokens_per_step)
    spans = stage_iterations([st.start for st in schedule.stages], train_iters)
    out = []
    for idx, (st, (first, n)) in enumerate(zip(schedule.stages, spans)):
        if n == 0:
            continue
        step = step_flops_closed(cfg, stage_shape(cfg, sampler, st), tokens_per_step)
        out.append(StageFlops(idx + 1, first, n, step * n, full * n))
    return out
