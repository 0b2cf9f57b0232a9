"""Parameter counts of every (TP, PP) rank of a layout, from the real model built on the meta device.

Nothing is allocated and no process group is needed: LanguageModel is constructed under torch.device("meta")
with the ParallelState a rank of the plan would have, so the shapes are exactly those training builds
(model/build.py). Data-parallel ranks are replicas of their (TP, PP) position and are not built again.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from megatron_est.config import Config, ModelConfig
from megatron_est.parallel.partition import stage_ranges
from megatron_est.parallel.layout import Layout
from megatron_est.parallel.state import ParallelState


@dataclass(frozen=True)
class RankParams:
    """Parameters held by one (TP, PP) rank, split by role."""
    tp_rank: int
    pp_rank: int
    embedding: int  # word embedding shard (+ learned positions) on the first stage
    lm_head: int  # untied output layer shard; with tied weights, the last stage's copy of the embedding (PP > 1)
    layers: int  # decoder layers of this stage
    final_norm: int
    largest_layer: int  # the biggest single decoder layer (ZeRO-3 gathers one at a time)
    replicated: int  # not sharded over TP (norms, row-parallel biases, positions): identical on every TP rank
    duplicate: int  # the tied embedding's second copy on the last stage (not a distinct model parameter)

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.layers + self.final_norm


def _state(world: int, tp: int, pp: int, tp_rank: int, pp_rank: int) -> ParallelState:
    layout = Layout.of(world, tp, pp)
    rank = layout.rank(tp=tp_rank, pp=pp_rank)  # data-parallel rank 0 of this (tp, pp) position
    return ParallelState(world, rank, tp, pp, layout.dp, device=torch.device("meta"))


@lru_cache(maxsize=256)
def _count(model_fields: tuple, ranges: tuple, tp: int, pp: int, tp_rank: int, pp_rank: int,
           seed: int) -> RankParams:
    from megatron_est.model.language_model import LanguageModel

    st = _state(tp * pp, tp, pp, tp_rank, pp_rank)
    with torch.device("meta"):
        model = LanguageModel(ModelConfig(**dict(model_fields)), st, seed=seed, layer_range=ranges[pp_rank],
                              pre_process=st.is_first_stage, post_process=st.is_last_stage)
    roles = dict(embedding=0, lm_head=0, layers=0, final_norm=0, replicated=0, duplicate=0)
    per_layer: dict[str, int] = {}
    for name, p in model.global_named_parameters():
        n = p.numel()
        if name.startswith("decoder.layers."):
            roles["layers"] += n
            layer = name.split(".")[2]
            per_layer[layer] = per_layer.get(layer, 0) + n
        elif name.startswith("final_norm."):
            roles["final_norm"] += n
        elif name.startswith("output_layer.") or getattr(p, "pipeline_duplicate", False):
            roles["lm_head"] += n
        else:
            roles["embedding"] += n
        if getattr(p, "pipeline_duplicate", False):
            roles["duplicate"] += n
        if not getattr(p, "tensor_parallel", False):
            roles["replicated"] += n
    return RankParams(tp_rank, pp_rank, largest_layer=max(per_layer.values(), default=0), **roles)


def rank_params(cfg: Config, tp_rank: int, pp_rank: int) -> RankParams:
    par = cfg.parallel
    # ModelConfig is a mutable dataclass (unhashable): the cache key is its fields as a tuple.
    return _count(tuple(sorted(vars(cfg.model).items())), stage_ranges(cfg), par.tensor_model_parallel_size,
                  par.pipeline_model_parallel_size, tp_rank, pp_rank, cfg.train.seed)


def all_rank_params(cfg: Config) -> list[RankParams]:
    """Every (TP, PP) position of the layout, pipeline stage by stage."""
    par = cfg.parallel
    return [rank_params(cfg, t, p) for p in range(par.pipeline_model_parallel_size)
            for t in range(par.tensor_model_parallel_size)]


def model_parameters(ranks: list[RankParams]) -> int:
    """Distinct parameters of the whole model: TP-sharded ones summed over TP, replicated ones once per stage,
    the tied embedding's pipeline copy not at all."""
    total = 0
    for r in ranks:
        total += r.total - r.duplicate - (r.replicated if r.tp_rank > 0 else 0)
    return total
