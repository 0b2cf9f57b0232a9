"""Static partition of the decoder layers over pipeline stages (even, or with a custom first/last stage).

A pure function of the configuration: every rank computes the same partition without communication, and the
EST sampler uses it as its layer strata so that each stage keeps the same share of its own layers.
"""
from __future__ import annotations

from typing import Optional

from megatron_est.config import Config, ConfigError

FIRST_FLAG = "--decoder-first-pipeline-num-layers"
LAST_FLAG = "--decoder-last-pipeline-num-layers"


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


def is_even(ranges: tuple[tuple[int, int], ...]) -> bool:
    return len({end - start for start, end in ranges}) == 1


def stage_ranges(cfg: Config) -> tuple[tuple[int, int], ...]:
    """[start, end) layer range of every pipeline stage of a run (ConfigError when the layers do not split)."""
    par = cfg.parallel
    return stage_layer_ranges(cfg.model.num_layers, par.pipeline_model_parallel_size,
                              par.decoder_first_pipeline_num_layers, par.decoder_last_pipeline_num_layers)
