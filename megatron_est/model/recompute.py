"""Activation recompute of the step's sampled subnetwork (--recompute-activations / --recompute-granularity).

full: each kept layer (optionally only the first --recompute-num-layers layers of a stage) keeps just its input;
its forward runs again during backward. selective: only the core attention (softmax(QK^T)V) is recomputed, as
in Megatron. Both use torch.utils.checkpoint (non-reentrant) with the layer's slicing plan as an argument, so the
recomputation runs exactly the heads, neurons and layers sampled for the step (skipped layers are neither run
nor recomputed), under the same autocast state.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from megatron_est.config import ConfigError

GRANULARITIES = ("full", "selective")


def configure_recompute(model: torch.nn.Module, granularity: Optional[str], num_layers: Optional[int] = None) -> None:
    """Switch recompute on (or off with granularity None) for a LanguageModel stage."""
    if granularity not in (None, *GRANULARITIES):
        raise ConfigError(f"--recompute-granularity: unknown value {granularity!r} (full or selective)")
    block = model.decoder
    block.recompute_full = granularity == "full"
    block.recompute_num_layers = num_layers
    for layer in block.layers:
        layer.attention.recompute_core = granularity == "selective"


def run_layer(block, offset: int, layer, x: torch.Tensor, plan, rope, scale: float = 1.0) -> torch.Tensor:
    n = getattr(block, "recompute_num_layers", None)
    if getattr(block, "recompute_full", False) and (n is None or offset < n) and torch.is_grad_enabled():
        return checkpoint(layer, x, plan, rope, scale, use_reentrant=False)
    return layer(x, plan, rope, scale)


def core_attention(module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if getattr(module, "recompute_core", False) and torch.is_grad_enabled():
        return checkpoint(sdpa, q, k, v, is_causal=True, enable_gqa=enable_gqa, use_reentrant=False)
    return sdpa(q, k, v, is_causal=True, enable_gqa=enable_gqa)
