"""Pre-norm transformer layer and the block of layers one pipeline stage owns; sampled-out layers are skipped."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megatron_est.config import ModelConfig
from megatron_est.model.attention import Attention
from megatron_est.model.mlp import MLP
from megatron_est.model.norms import Norm
from megatron_est.model.plan import LayerPlan, ModelPlan
from megatron_est.model.recompute import run_layer
from megatron_est.parallel.state import ParallelState


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, st: ParallelState, layer: int, seed: int):
        super().__init__()
        self.input_norm = Norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon)
        self.attention = Attention(cfg, st, layer, seed)
        self.post_attention_norm = Norm(cfg.normalization, cfg.hidden_size, cfg.norm_epsilon)
        self.mlp = MLP(cfg, st, layer, seed)

    def make_plan(self, heads: Optional[torch.Tensor], neurons: Optional[torch.Tensor]) -> LayerPlan:
        return LayerPlan(self.attention.make_plan(heads), self.mlp.make_plan(neurons))

    def trained_slices(self, plan: LayerPlan) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
        return self.attention.trained_slices(plan.attn) + self.mlp.trained_slices(plan.mlp)

    def forward(self, x: torch.Tensor, plan: LayerPlan, rope, branch_scale: float = 1.0) -> torch.Tensor:
        # a sampled layer's branch scale is applied inside each branch's output projection (its GEMM's alpha)
        x = x + self.attention(self.input_norm(x), plan.attn, rope, branch_scale)
        return x + self.mlp(self.post_attention_norm(x), plan.mlp, branch_scale)


class TransformerBlock(nn.Module):
    """Layers [first, last) of the model (all of them without pipeline parallelism)."""

    def __init__(self, cfg: ModelConfig, st: ParallelState, seed: int, first: int, last: int):
        super().__init__()
        self.first = first
        self.layers = nn.ModuleList(TransformerLayer(cfg, st, i, seed) for i in range(first, last))

    def forward(self, x: torch.Tensor, plan: Optional[ModelPlan], rope) -> torch.Tensor:
        for offset, layer in enumerate(self.layers):
            if plan is None:
                x = run_layer(self, offset, layer, x, LayerPlan(None, None), rope)
                continue
            lp = plan.layers.get(self.first + offset)
            if lp is not None:  # a sampled-out layer is the identity on the residual stream: not run at all
                x = run_layer(self, offset, layer, x, lp, rope, plan.layer_scale)  # (recomputed if asked)
        return x
