"""Column- and row-parallel linears and a vocab-parallel embedding that can run on a slice of their units.

`index` selects output rows (column-parallel) or input columns (row-parallel) of the LOCAL shard, so the matmul
itself shrinks; gradients of unselected rows/columns are zero. A sliced weight's gradient is added straight into
the kept rows/columns of its .grad (parallel/sliced_grad.py), not built as a full-size temporary.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_est.parallel.embedding_grad import embedding_lookup, head_logits
from megatron_est.parallel.init import normal_full, shard
from megatron_est.parallel.mappings import copy_to_tp, reduce_from_tp
from megatron_est.parallel.scaled_linear import scaled_linear
from megatron_est.parallel.sliced_grad import sliced_weight
from megatron_est.parallel.state import ParallelState
from megatron_est.parallel.storage import column_major_copy


def _mark_tp(p: nn.Parameter, dim: int) -> nn.Parameter:
    p.tensor_parallel = True  # sharded over TP: its gradient norm is summed over the TP group
    p.partition_dim = dim  # the dimension along which TP shards are concatenated to rebuild the full tensor
    return p


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows; the input is replicated, the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, st: ParallelState, *, std: float,
                 seed: int, name: str, full_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.group = st.tp_group
        full = normal_full((out_features, in_features), std, seed, name) if full_weight is None else full_weight
        self.weight = _mark_tp(nn.Parameter(shard(full, 0, st.tp_rank, st.tp)), 0)
        self.bias = _mark_tp(nn.Parameter(torch.zeros(out_features // st.tp)), 0) if bias else None

    def forward(self, x: torch.Tensor, index: Optional[torch.Tensor] = None, copy_input: bool = True
                ) -> torch.Tensor:
        # copy_input=False when the caller already applied copy_to_tp (two linears reading one input).
        if copy_input:
            x = copy_to_tp(x, self.group)
        w, b = self.weight, self.bias
        if index is not None:
            w = sliced_weight(w, 0, index)
            b = None if b is None else sliced_weight(b, 0, index)
        return F.linear(x, w, b)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; partial outputs are summed over TP, bias added after."""

    def __init__(self, in_features: int, out_features: int, bias: bool, st: ParallelState, *, std: float,
                 seed: int, name: str):
        super().__init__()
        self.group, self.tp = st.tp_group, st.tp
        full = normal_full((out_features, in_features), std, seed, name)
        # stored column by column: EST keeps whole input columns (parallel/storage.py)
        self.weight = _mark_tp(nn.Parameter(column_major_copy(shard(full, 1, st.tp_rank, st.tp))), 1)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor, index: Optional[torch.Tensor] = None, scale: float = 1.0,
                out_scale: float = 1.0) -> torch.Tensor:
        """out_scale * (scale * x W^T + b): `scale` is EST's rescale of the sampled sum (N / k), `out_scale` a
        sampled layer's branch scale, which scales the bias too. Both ride in the GEMM (parallel/scaled_linear.py).
        Without TP the bias joins the GEMM as well; with TP it is added once, after the partial sums are reduced."""
        w = self.weight if index is None else sliced_weight(self.weight, 1, index)
        b = self.bias if self.bias is None or out_scale == 1.0 else self.bias * out_scale
        if self.tp == 1:
            return scaled_linear(x, w, b, scale * out_scale)
        y = reduce_from_tp(scaled_linear(x, w, None, scale * out_scale), self.group)
        return y if b is None else y + b


class VocabParallelEmbedding(nn.Module):
    """Embedding with the (padded) vocabulary split over TP ranks."""

    def __init__(self, vocab: int, hidden: int, st: ParallelState, *, std: float, seed: int, name: str):
        super().__init__()
        self.group, self.tp = st.tp_group, st.tp
        self.per_rank = vocab // st.tp
        self.start = st.tp_rank * self.per_rank
        full = normal_full((vocab, hidden), std, seed, name)
        self.weight = _mark_tp(nn.Parameter(shard(full, 0, st.tp_rank, st.tp)), 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return embedding_lookup(self.weight, ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = embedding_lookup(self.weight, local.masked_fill(outside, 0))
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)


def parallel_lm_logits(h: torch.Tensor, weight: torch.Tensor, st: ParallelState) -> torch.Tensor:
    """Logits for this rank's vocabulary shard: [.., hidden] x [V/tp, hidden]^T (parallel/embedding_grad.py)."""
    return head_logits(copy_to_tp(h, st.tp_group), weight)
