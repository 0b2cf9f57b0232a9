"""Causal self-attention (MHA or grouped-query) over this rank's heads, optionally sliced to kept heads.

The fused QKV weight is stored per KV group: [q heads of the group (r * d rows), k (d rows), v (d rows)], so
a tensor-parallel split by whole groups keeps each rank's queries with their keys and values.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from megatron_est.config import ModelConfig
from megatron_est.model.plan import AttnPlan, local_slice, unit_rows
from megatron_est.model.recompute import core_attention
from megatron_est.model.rope import apply_rope
from megatron_est.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_est.parallel.state import ParallelState


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, st: ParallelState, layer: int, seed: int):
        super().__init__()
        self.d, self.r = cfg.head_dim, cfg.queries_per_group
        self.n_heads = cfg.num_attention_heads
        self.local_heads = cfg.num_attention_heads // st.tp
        self.local_groups = cfg.num_query_groups // st.tp
        self.head_start = st.tp_rank * self.local_heads
        std, out_std = cfg.init_method_std, cfg.init_method_std / math.sqrt(2 * cfg.num_layers)
        qkv_out = cfg.num_query_groups * (self.r + 2) * self.d
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_out, cfg.add_bias, st, std=std, seed=seed,
                                        name=f"layers.{layer}.attention.qkv")
        self.proj = RowParallelLinear(cfg.num_attention_heads * self.d, cfg.hidden_size, cfg.add_bias, st,
                                      std=out_std, seed=seed, name=f"layers.{layer}.attention.proj")

    def make_plan(self, kept: Optional[torch.Tensor]) -> Optional[AttnPlan]:
        """Translate kept global query heads into local weight rows/columns."""
        if kept is None:
            return None
        r, block = self.r, self.r + 2
        local = local_slice(kept, self.head_start, self.head_start + self.local_heads)
        group_of = local // r
        groups = torch.unique(group_of)
        rows = torch.cat([unit_rows(group_of * block + local % r, self.d),
                          unit_rows(groups * block + r, self.d),
                          unit_rows(groups * block + r + 1, self.d)])
        counts = torch.bincount(group_of)
        counts = counts[counts > 0]
        uneven = len(counts) > 1 and bool((counts != counts[0]).any())
        kv_map = torch.searchsorted(groups, group_of) if uneven else None
        return AttnPlan(rows, unit_rows(local, self.d), len(local), len(groups), kv_map,
                        self.n_heads / len(kept))

    def trained_slices(self, plan: Optional[AttnPlan]) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
        """(weight, dim, local indices) of what a step on this plan computes: the kept heads' QKV rows and
        output-projection columns. None (all heads): nothing is sliced."""
        if plan is None:
            return []
        out = [(self.qkv.weight, 0, plan.qkv_rows), (self.proj.weight, 1, plan.proj_cols)]
        if self.qkv.bias is not None:
            out.append((self.qkv.bias, 0, plan.qkv_rows))
        return out

    def forward(self, x: torch.Tensor, plan: Optional[AttnPlan],
                rope: Optional[tuple[torch.Tensor, torch.Tensor]], out_scale: float = 1.0) -> torch.Tensor:
        b, s, _ = x.shape
        d = self.d
        if plan is None:
            qkv = self.qkv(x).view(b, s, self.local_groups, self.r + 2, d)
            # one split, not three slices: its backward writes one [.., r + 2, d] gradient, where each slice's
            # would zero-fill a full-size one and add into it
            q, k, v = qkv.split([self.r, 1, 1], dim=3)
            q, k, v = q.reshape(b, s, self.local_heads, d), k.squeeze(3), v.squeeze(3)
            n_q, n_kv, kv_map, cols, scale = self.local_heads, self.local_groups, None, None, 1.0
        else:
            n_q, n_kv, kv_map, cols, scale = plan.n_q, plan.n_kv, plan.kv_map, plan.proj_cols, plan.scale
            q, k, v = self.qkv(x, plan.qkv_rows).split([n_q * d, n_kv * d, n_kv * d], dim=-1)
            q, k, v = q.view(b, s, n_q, d), k.view(b, s, n_kv, d), v.view(b, s, n_kv, d)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_map is not None:  # unequal kept heads per KV group: give each query head its own K/V copy
            k, v = k.index_select(1, kv_map), v.index_select(1, kv_map)
        if n_q == 0:  # this shard kept no head (unstratified sampling); still join the TP collectives, the
            # backward one of the qkv input too: an empty output still wired to q, not a fresh zeros tensor
            out = q.transpose(1, 2).reshape(b, s, 0)
        else:
            o = core_attention(self, q, k, v, enable_gqa=k.shape[1] != n_q)  # (recomputed if selective)
            out = o.transpose(1, 2).reshape(b, s, n_q * d)
        return self.proj(out, cols, scale, out_scale)
