"""Gradient synchronisation and clipping that tolerate parameters without gradients.

Under EST a skipped layer's parameters get no gradient at all (grad is None). Every data-parallel rank trains
the same subnetwork, so the set of parameters with gradients is identical on all of them: we all-reduce exactly
that set (skipped layers cost no communication) and never wait for a gradient that will not come.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_est.parallel.storage import contiguous_view

_BUCKET_NUMEL = 32 * 1024 * 1024


def _buckets(tensors: list[torch.Tensor], size: int = _BUCKET_NUMEL) -> Iterable[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype, up to `size` elements each (a larger tensor alone)."""
    bucket, numel = [], 0
    for t in tensors:
        if bucket and (numel + t.numel() > size or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, numel = [], 0
        bucket.append(t)
        numel += t.numel()
    if bucket:
        yield bucket


def all_reduce_mean(tensors: list[torch.Tensor], group: Optional[dist.ProcessGroup], size: int) -> None:
    """Average tensors in place over a group, in flattened buckets."""
    if size == 1 or not tensors:
        return
    for bucket in _buckets([contiguous_view(t) for t in tensors]):  # flattened in memory order (storage.py)
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(synced)


def sync_data_parallel_grads(params: list[torch.nn.Parameter], group, dp: int) -> None:
    all_reduce_mean([p.grad for p in params if p.grad is not None], group, dp)


def sync_tied_embedding_grads(params: list[torch.nn.Parameter], group: Optional[dist.ProcessGroup]) -> None:
    """Sum the gradients of the word embedding's two copies (first and last pipeline stage).

    Both copies start equal and then receive the same summed gradient, so they stay equal: one tied weight,
    as without pipelining. Only parameters marked `tied_embedding` (set when pp > 1) take part.
    """
    for p in params:
        if getattr(p, "tied_embedding", False):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=group)


def zero_fill_missing_grads(params: list[torch.nn.Parameter]) -> None:
    """Give parameters outside this step's subnetwork a zero gradient, so AdamW treats all rows alike."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def grad_norm_and_clip(params: list[torch.nn.Parameter], max_norm: float, tp_group, tp: int,
                       pp_group=None, pp: int = 1) -> float:
    """Global L2 norm of all gradients of the (sharded) model; clip in place when max_norm > 0.

    TP-sharded parameters contribute their shard on every TP rank (summed over TP); replicated ones count once.
    Stages sum over the pipeline group; the last stage's copy of the tied embedding (`pipeline_duplicate`) is
    left out of the norm so the tied weight counts once, but is clipped like the rest.
    """
    grads = [p for p in params if p.grad is not None]
    counted = [p for p in grads if not getattr(p, "pipeline_duplicate", False)]
    sharded = [p.grad for p in counted if getattr(p, "tensor_parallel", False)]
    replicated = [p.grad for p in counted if not getattr(p, "tensor_parallel", False)]
    dev = grads[0].grad.device if grads else torch.device("cpu")
    sq_sharded = _sum_sq(sharded, dev)
    if tp > 1:
        dist.all_reduce(sq_sharded, group=tp_group)
    total_sq = sq_sharded + _sum_sq(replicated, dev)
    if pp > 1:
        dist.all_reduce(total_sq, group=pp_group)
    norm = math.sqrt(float(total_sq))
    # A pipeline stage whose layers were all skipped may hold no gradient at all (freeze leaves them None); it
    # still joined the norm's all-reduce above, and has nothing to scale.
    if max_norm > 0 and norm > max_norm and grads:
        torch._foreach_mul_([p.grad for p in grads], max_norm / (norm + 1e-6))
    return norm


def _sum_sq(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch._foreach_norm(tensors)
    return torch.stack([n.float() for n in norms]).pow(2).sum()
