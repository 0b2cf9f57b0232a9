"""Feed-forward block (GELU for GPT-2, SwiGLU for Llama) over this rank's neurons, optionally sliced."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_est.config import ModelConfig
from megatron_est.model.plan import MLPPlan, local_slice
from megatron_est.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_est.parallel.mappings import copy_to_tp
from megatron_est.parallel.state import ParallelState


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, st: ParallelState, layer: int, seed: int):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        self.group = st.tp_group
        self.ffn = cfg.ffn_hidden_size
        self.local = cfg.ffn_hidden_size // st.tp
        self.start = st.tp_rank * self.local
        std, out_std = cfg.init_method_std, cfg.init_method_std / math.sqrt(2 * cfg.num_layers)
        h, f, bias, name = cfg.hidden_size, cfg.ffn_hidden_size, cfg.add_bias, f"layers.{layer}.mlp"
        if self.swiglu:
            self.gate = ColumnParallelLinear(h, f, bias, st, std=std, seed=seed, name=f"{name}.gate")
            self.up = ColumnParallelLinear(h, f, bias, st, std=std, seed=seed, name=f"{name}.up")
        else:
            self.fc1 = ColumnParallelLinear(h, f, bias, st, std=std, seed=seed, name=f"{name}.fc1")
        self.fc2 = RowParallelLinear(f, h, bias, st, std=out_std, seed=seed, name=f"{name}.fc2")

    def make_plan(self, kept: Optional[torch.Tensor]) -> Optional[MLPPlan]:
        if kept is None:
            return None
        return MLPPlan(local_slice(kept, self.start, self.start + self.local), self.ffn / len(kept))

    def trained_slices(self, plan: Optional[MLPPlan]) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
        """(weight, dim, local indices) of what a step on this plan computes: the kept neurons' input rows
        (and biases) and output columns. None (all neurons): nothing is sliced."""
        if plan is None:
            return []
        out = []
        for lin in ((self.gate, self.up) if self.swiglu else (self.fc1,)):
            out.append((lin.weight, 0, plan.index))
            if lin.bias is not None:
                out.append((lin.bias, 0, plan.index))
        return out + [(self.fc2.weight, 1, plan.index)]

    def forward(self, x: torch.Tensor, plan: Optional[MLPPlan], out_scale: float = 1.0) -> torch.Tensor:
        idx, scale = (None, 1.0) if plan is None else (plan.index, plan.scale)
        if self.swiglu:
            x = copy_to_tp(x, self.group)
            hidden = F.silu(self.gate(x, idx, copy_input=False)) * self.up(x, idx, copy_input=False)
        else:
            hidden = F.gelu(self.fc1(x, idx), approximate="tanh")
        return self.fc2(hidden, idx, scale, out_scale)
