"""Training FLOPs counted from the shapes actually run.

Counting rule (the per-token costs: megatron_est/flops_rule.py): every matmul of m x k by k x n costs 2*m*k*n
FLOPs; a training step costs 3x its forward pass (backward = 2x forward). Counted: QKV projection (kept query
heads plus the KV heads they use), attention scores and attention-weighted values over the full s x s square
(as Megatron counts them, ignoring the causal half), output projection, the MLP over kept neurons, and the LM
head over the padded vocabulary. Not counted: embedding lookups, norms, activations, softmax, the optimizer.
Skipped layers cost nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_est.config import ModelConfig
from megatron_est.flops_rule import head_forward_flops_per_token, layer_forward_flops_per_token
from megatron_est.est.sampler import Subnetwork


def _kv_heads_used(cfg: ModelConfig, kept_heads: Optional[torch.Tensor]) -> int:
    if kept_heads is None:
        return cfg.num_query_groups
    return int(torch.unique(kept_heads // cfg.queries_per_group).numel())


def step_flops(cfg: ModelConfig, tokens: int, sub: Optional[Subnetwork] = None) -> int:
    """Training FLOPs of one optimizer step over `tokens` tokens (all micro-batches, all data-parallel ranks)."""
    return stage_step_flops(cfg, tokens, sub, (0, cfg.num_layers), with_head=True)


def stage_step_flops(cfg: ModelConfig, tokens: int, sub: Optional[Subnetwork], layer_range: tuple[int, int],
                     with_head: bool) -> int:
    """The share of step_flops run by the layers [start, end) of one pipeline stage (and the LM head when it
    is the last stage): the pipeline's step time follows the stage with the most."""
    per_token = head_forward_flops_per_token(cfg) if with_head else 0
    for i in range(*layer_range):
        if sub is None or sub.is_full:
            n_q, n_kv, n_m = cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size
        elif i not in sub.layers:
            continue
        else:
            heads, neurons = sub.heads[i], sub.neurons[i]
            n_q = cfg.num_attention_heads if heads is None else len(heads)
            n_kv = _kv_heads_used(cfg, heads)
            n_m = cfg.ffn_hidden_size if neurons is None else len(neurons)
        per_token += layer_forward_flops_per_token(cfg, n_q, n_kv, n_m)
    return 3 * per_token * tokens
