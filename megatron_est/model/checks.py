"""The model's own refusals: shapes that no layout can build (validation.validate runs these first)."""
from __future__ import annotations

from megatron_est.config import ConfigError, ModelConfig


def check_model(m: ModelConfig) -> None:
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                          f"{m.num_attention_heads}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by --num-query-groups "
                          f"{m.num_query_groups}")
    if m.seq_length > m.max_position_embeddings:
        raise ConfigError(f"--seq-length {m.seq_length} exceeds --max-position-embeddings "
                          f"{m.max_position_embeddings}")
    if m.position_embedding == "rope" and m.head_dim % 2:
        raise ConfigError(f"rotary embeddings need an even head size (--hidden-size {m.hidden_size} / "
                          f"--num-attention-heads {m.num_attention_heads} = {m.head_dim})")
