"""Per-step slicing plans: the sampled subnetwork translated to index tensors of this rank's local shards.

Built once per step on the CPU (cheap), moved to the device, and passed down through forward().
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class AttnPlan:
    qkv_rows: torch.Tensor  # rows of the local fused QKV weight to compute
    proj_cols: torch.Tensor  # input columns of the local output projection
    n_q: int  # kept local query heads
    n_kv: int  # local KV heads computed
    kv_map: Optional[torch.Tensor]  # per kept query head, its KV head; None when plain GQA/MHA grouping holds
    scale: float  # N_H / k_H (global)


@dataclass
class MLPPlan:
    index: torch.Tensor  # kept local neurons
    scale: float  # N_M / k_M (global)


@dataclass
class LayerPlan:
    attn: Optional[AttnPlan]  # None: all heads
    mlp: Optional[MLPPlan]  # None: all neurons


@dataclass
class ModelPlan:
    layers: dict[int, LayerPlan]  # global layer index -> plan, only for kept layers of this stage
    layer_scale: float = 1.0


def local_slice(kept: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Kept global indices that fall in this shard's [start, end), made local."""
    return kept[(kept >= start) & (kept < end)] - start


def unit_rows(units: torch.Tensor, width: int, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Expand unit indices (heads) to the row indices of their `width` rows each."""
    return ((units * width + offset).unsqueeze(-1) + torch.arange(width)).flatten()
