"""The FLOPs counting rule per token (docs/est.md): forward FLOPs of one decoder layer and of the LM head.

One leaf module, because two layers below EST need it: est/flops.py counts training FLOPs with it, and the
pipeline partition (parallel/partition.py, --pipeline-partition balanced) weighs the LM head against the layers
with it. Every matmul of m x k by k x n costs 2*m*k*n; attention scores and attention-weighted values are
counted over the full s x s square (as Megatron counts them).
"""
from __future__ import annotations

from megatron_est.config import ModelConfig


def layer_forward_flops_per_token(cfg: ModelConfig, n_q: int, n_kv: int, n_neurons: int) -> int:
    h, d, s = cfg.hidden_size, cfg.head_dim, cfg.seq_length
    qkv = 2 * h * (n_q + 2 * n_kv) * d
    scores = 2 * 2 * n_q * s * d  # Q K^T and A V
    proj = 2 * n_q * d * h
    mlp = 2 * h * n_neurons * (3 if cfg.activation == "swiglu" else 2)
    return qkv + scores + proj + mlp


def full_layer_forward_flops_per_token(cfg: ModelConfig) -> int:
    return layer_forward_flops_per_token(cfg, cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size)


def head_forward_flops_per_token(cfg: ModelConfig) -> int:
    return 2 * cfg.hidden_size * cfg.padded_vocab_size
