"""The parallel layout's own refusals: the launcher's world against the flags, and what each TP shard and
pipeline stage must split evenly. Returns the layout (the one place its arithmetic lives: layout.py)."""
from __future__ import annotations

from megatron_est.config import Config, ConfigError
from megatron_est.parallel.layout import Layout
from megatron_est.parallel.partition import stage_ranges


def check_parallel(cfg: Config, world_size: int) -> Layout:
    par, m = cfg.parallel, cfg.model
    if par.world_size is not None and par.world_size != world_size:
        raise ConfigError(f"--world-size {par.world_size} disagrees with the launcher's world size {world_size}")
    tp = par.tensor_model_parallel_size
    layout = Layout.of(world_size, tp, par.pipeline_model_parallel_size)  # refuses a world that does not split
    for flag, value in (("--num-attention-heads", m.num_attention_heads), ("--num-query-groups", m.num_query_groups),
                        ("--ffn-hidden-size", m.ffn_hidden_size)):
        if value % tp:
            raise ConfigError(f"{flag} {value} is not divisible by --tensor-model-parallel-size {tp}")
    if m.padded_vocab_size % tp:
        raise ConfigError(f"padded vocabulary {m.padded_vocab_size} is not divisible by "
                          f"--tensor-model-parallel-size {tp} (raise --make-vocab-size-divisible-by)")
    stage_ranges(cfg)  # refuses a layer count that does not split over the stages
    return layout
