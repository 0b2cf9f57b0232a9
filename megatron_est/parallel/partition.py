"""Static partition of the decoder layers over pipeline stages: even, with a custom first/last stage, or
balanced by cost (--pipeline-partition balanced: the first/last stage counts that even out the FLOPs).

A pure function of the configuration: every rank computes the same partition without communication, and the
EST sampler uses it as its default layer strata so that each stage keeps the same share of its own layers.
"""
from __future__ import annotations

from typing import Optional

from megatron_est.config import Config, ConfigError, ModelConfig
from megatron_est.flops_rule import full_layer_forward_flops_per_token, head_forward_flops_per_token

FIRST_FLAG = "--decoder-first-pipeline-num-layers"
LAST_FLAG = "--decoder-last-pipeline-num-layers"
PARTITION_FLAG = "--pipeline-partition"


def stage_layer_ranges(num_layers: int, pp: int, first: Optional[int] = None,
                       last: Optional[int] = None) -> tuple[tuple[int, int], ...]:
    """[start, end) global layer range of every stage; refuse a layer count that does not split."""
    if pp == 1:
        if first is not None or last is not None:
            raise ConfigError(f"{FIRST_FLAG} / {LAST_FLAG} need --pipeline-model-parallel-size > 1")
        return ((0, num_layers),)
    sizes: list[Optional[int]] = [None] * pp
    sizes[0], sizes[-1] = first, last
    fixed = [s for s in sizes if s is not None]
    if any(s < 0 for s in fixed):
        raise ConfigError(f"{FIRST_FLAG} and {LAST_FLAG} must be >= 0")
    rest, n_free = num_layers - sum(fixed), sizes.count(None)
    if not fixed and rest % pp != 0:
        raise ConfigError(f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if n_free == 0 and rest != 0:
        raise ConfigError(f"{FIRST_FLAG} {first} + {LAST_FLAG} {last} must equal --num-layers {num_layers} with "
                          f"--pipeline-model-parallel-size {pp}")
    if rest < 0 or (n_free > 0 and rest % n_free != 0):
        raise ConfigError(f"--num-layers {num_layers} minus {FIRST_FLAG} / {LAST_FLAG} leaves {rest} layers, "
                          f"not divisible by the {n_free} other stages of --pipeline-model-parallel-size {pp}")
    each = rest // n_free if n_free else 0
    ranges, start = [], 0
    for s in sizes:
        n = each if s is None else s
        ranges.append((start, start + n))
        start += n
    return tuple(ranges)


def balanced_first_last(num_layers: int, pp: int, head_cost: float) -> tuple[int, int]:
    """First and last stage layer counts (the middle stages split the rest evenly, as with the two flags) that
    minimise the largest stage's cost, a layer costing 1 and the LM head on the last stage `head_cost` (the
    embedding lookup costs no FLOPs). Ties go to the split closest to even. Every stage keeps >= 1 layer."""
    middle, even, best = pp - 2, num_layers / pp, None
    for last in range(1, num_layers - pp + 2):
        for first in range(1, num_layers - last - middle + 1):
            rest = num_layers - first - last  # >= middle by the range
            if rest % max(1, middle) or (middle == 0 and rest):
                continue
            sizes = [first, *[rest // max(1, middle)] * middle, last]
            key = (round(max(sizes[:-1] + [last + head_cost]), 9), sum((n - even) ** 2 for n in sizes))
            if best is None or key < best[0]:
                best = (key, (first, last))
    if best is None:
        raise ConfigError(f"{PARTITION_FLAG} balanced: --num-layers {num_layers} cannot give each of "
                          f"--pipeline-model-parallel-size {pp} stages a layer")
    return best[1]


def head_cost_in_layers(m: ModelConfig) -> float:
    """The LM head's forward FLOPs per token in units of one full decoder layer's (megatron_est/flops_rule.py)."""
    return head_forward_flops_per_token(m) / full_layer_forward_flops_per_token(m)


def first_last(cfg: Config) -> tuple[Optional[int], Optional[int]]:
    """The first/last stage layer counts of a run: the flags', or the balanced choice (None: an even share)."""
    par = cfg.parallel
    first, last = par.decoder_first_pipeline_num_layers, par.decoder_last_pipeline_num_layers
    if par.pipeline_partition != "balanced" or par.pipeline_model_parallel_size == 1:
        return first, last
    if first is not None or last is not None:
        raise ConfigError(f"{PARTITION_FLAG} balanced chooses {FIRST_FLAG} / {LAST_FLAG} itself; give one or the "
                          f"other")
    return balanced_first_last(cfg.model.num_layers, par.pipeline_model_parallel_size, head_cost_in_layers(cfg.model))


def stage_ranges(cfg: Config) -> tuple[tuple[int, int], ...]:
    """[start, end) layer range of every pipeline stage of a run (ConfigError when the layers do not split)."""
    return stage_layer_ranges(cfg.model.num_layers, cfg.parallel.pipeline_model_parallel_size, *first_last(cfg))
