"""Per-step subnetwork sampling: a pure function of (seed, iteration).

Every rank (TP, PP, DP) calls it with the same arguments and gets the same subnetwork, so no communication is
needed and a resumed run redraws identical subnetworks. It uses its own torch.Generator, never the global RNG.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_est.config import ConfigError, ModelConfig
from megatron_est.est.schedule import Schedule, Stage


def keep_count(p: float, n: int) -> int:
    """round(p * n) with halves rounded up (not Python's banker's rounding), and at least one unit."""
    return max(1, min(n, int(p * n + 0.5)))


@dataclass(frozen=True)
class Subnetwork:
    """Which layers, heads and neurons train this step. None means "all" (no slicing)."""
    stage: int
    rates: Stage
    layers: tuple[int, ...]  # kept global layer indices, ascending
    heads: tuple[Optional[torch.Tensor], ...]  # per layer: kept global query-head indices (ascending)
    neurons: tuple[Optional[torch.Tensor], ...]  # per layer: kept global MLP neuron indices (ascending)
    layer_scale: float  # multiplier on active residual branches (N_L / k_L when rescaling, else 1)

    @property
    def is_full(self) -> bool:
        return self.rates.is_full

    def kept_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class Strata:
    """Partition of each sampled dimension into strata that keep equal counts (sampling parameters, not the
    layout: strata that line up with the TP shards and pipeline stages balance their work, est/balance.py)."""
    heads: int  # strata over the query heads of a layer (ignored with GQA: strata are the KV groups)
    neurons: int  # strata over the MLP neurons of a layer
    layers: tuple[tuple[int, int], ...]  # [start, end) layer ranges (--est-pp-strata equal ones)


def even_ranges(n: int, parts: int) -> tuple[tuple[int, int], ...]:
    size = n // parts
    return tuple((i * size, (i + 1) * size) for i in range(parts))


def _generator(seed: int, iteration: int) -> torch.Generator:
    # A fixed integer mix of (seed, iteration); independent of any global RNG state.
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + iteration * 7_919 + 0x5EED) % (2**63 - 1))
    return g


def end_layers(num_layers: int) -> tuple[int, ...]:
    """The layers --est-keep-end-layers always keeps: the first and the last."""
    return tuple(sorted({0, num_layers - 1}))


def forced_conflict(ranges: Sequence[tuple[int, int]], forced: Sequence[int], p: float) -> Optional[str]:
    """Why a layer stratum cannot keep all its forced layers at rate p (None when every one can)."""
    for start, end in ranges:
        mine = [i for i in forced if start <= i < end]
        if len(mine) > keep_count(p, end - start):
            return (f"layers {start}-{end - 1} keep {keep_count(p, end - start)} of {end - start} at p_L {p:g}, "
                    f"fewer than the {len(mine)} end layers {mine} they must keep")
    return None


def _sample_strata(g: torch.Generator, ranges: Sequence[tuple[int, int]], p: float,
                   forced: Sequence[int] = ()) -> torch.Tensor:
    """Keep keep_count(p, size) indices uniformly without replacement inside each [start, end) range. A range
    holding forced indices keeps them and draws only the rest of its count among its other indices (the same
    count, and without forced indices the same draw from the generator)."""
    problem = forced_conflict(ranges, forced, p)
    if problem is not None:  # est/checks.py refuses this up front; here for samplers built by hand
        raise ConfigError(f"--est-keep-end-layers: {problem}")
    kept = []
    for start, end in ranges:
        mine = [i for i in forced if start <= i < end]
        n, k = end - start, keep_count(p, end - start)
        if not mine:
            kept.append(torch.randperm(n, generator=g)[:k] + start)
            continue
        others = torch.tensor([i for i in range(start, end) if i not in mine], dtype=torch.long)
        draw = torch.randperm(len(others), generator=g)[: k - len(mine)]
        kept += [torch.tensor(mine, dtype=torch.long), others[draw]]
    return torch.cat(kept).sort().values


class SubnetworkSampler:
    def __init__(self, model: ModelConfig, schedule: Schedule, seed: int, strata: Strata,
                 stratified: bool = True, layer_rescale: bool = False, keep_end_layers: bool = False):
        self.model, self.schedule, self.seed = model, schedule, seed
        self.strata, self.stratified, self.layer_rescale = strata, stratified, layer_rescale
        self.keep_end_layers = keep_end_layers

    def forced_layers(self) -> tuple[int, ...]:
        """Layers every layer-sampling step keeps (--est-keep-end-layers: the first and the last)."""
        return end_layers(self.model.num_layers) if self.keep_end_layers else ()

    # The ranges each dimension is sampled in (keep_count(p, size) kept in each); est/stage_flops.py counts
    # a stage's FLOPs from them in closed form.
    def head_ranges(self) -> list[tuple[int, int]]:
        m = self.model
        if not self.stratified:
            return [(0, m.num_attention_heads)]
        if m.queries_per_group > 1:  # GQA: same number of query heads in every KV group
            r = m.queries_per_group
            return [(g * r, (g + 1) * r) for g in range(m.num_query_groups)]
        return list(even_ranges(m.num_attention_heads, self.strata.heads))

    def neuron_ranges(self) -> list[tuple[int, int]]:
        parts = self.strata.neurons if self.stratified else 1
        return list(even_ranges(self.model.ffn_hidden_size, parts))

    def layer_ranges(self) -> list[tuple[int, int]]:
        return list(self.strata.layers) if self.stratified else [(0, self.model.num_layers)]

    def __call__(self, iteration: int) -> Subnetwork:
        m = self.model
        stage_idx = self.schedule.stage_index(iteration)
        rates = self.schedule.stages[stage_idx]
        if rates.is_full:
            return Subnetwork(stage_idx, rates, tuple(range(m.num_layers)), (None,) * m.num_layers,
                              (None,) * m.num_layers, 1.0)
        g = _generator(self.seed, iteration)
        if rates.p_layers < 1.0:
            layers = tuple(_sample_strata(g, self.layer_ranges(), rates.p_layers, self.forced_layers()).tolist())
        else:
            layers = tuple(range(m.num_layers))
        heads, neurons = [], []
        for _ in range(m.num_layers):  # draw for every layer so a layer's draw does not depend on others
            heads.append(_sample_strata(g, self.head_ranges(), rates.p_heads) if rates.p_heads < 1 else None)
            neurons.append(_sample_strata(g, self.neuron_ranges(), rates.p_mlp) if rates.p_mlp < 1 else None)
        scale = m.num_layers / len(layers) if self.layer_rescale else 1.0
        return Subnetwork(stage_idx, rates, layers, tuple(heads), tuple(neurons), scale)
