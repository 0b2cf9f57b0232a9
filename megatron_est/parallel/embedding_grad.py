"""The word embedding's and the LM head's weight gradients without [vocab, hidden] temporaries.

Autograd's embedding backward builds a zero [vocab, hidden] tensor and adds the looked-up rows' gradients into it,
and with tied embeddings then adds that whole tensor to the LM head's gradient: two full passes over the
vocabulary per micro-batch for a gradient that touches at most one row per token. Here:

- the lookup's backward sums each looked-up row's gradients in a compact [distinct ids, hidden] tensor and adds
  those rows alone into the weight's gradient;
- with a tied weight on the same stage, the LM head's backward leaves its gradient with the weight
  (`_head_grad`) for the lookup's backward, which runs after it (its input came through every layer), to add
  its rows into, before the sum goes to .grad.

The values are autograd's bit for bit: each row receives the same additions in the same order (the head's
gradient + (0 + g1 + g2 ...)), then .grad gets the sum as AccumulateGrad would give it. As for sliced weights
(parallel/sliced_grad.py), where the accumulation is hooked (DeepSpeed), partitioned (ZeRO-3) or switched off,
autograd's own path runs instead; under autocast too (the head's matmul then runs on a half-precision copy of the
weight that autograd keeps for its backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_est.parallel.sliced_grad import direct_grads_apply, zeroed_grad


def _direct(weight: torch.Tensor) -> bool:
    return direct_grads_apply(weight) and not torch.is_autocast_enabled(weight.device.type)


def embedding_lookup(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """F.embedding(ids, weight), with the weight's gradient added row by row (see the module docstring) when the
    vocabulary has more rows than the lookup has ids: only then does the compact sum touch less than autograd's
    [vocab, hidden] tensor (a 1,024-word vocabulary over 4,096 tokens is cheaper autograd's way)."""
    direct = _direct(weight) and weight.shape[0] > ids.numel()
    weight._lookup_path = "direct" if direct else "autograd"  # for the tied head's backward (head_logits)
    return _Lookup.apply(weight, ids) if direct else F.embedding(ids, weight)


def head_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(h, weight). When this forward looked the same (tied) weight up, the head takes the lookup's
    path: it leaves its gradient for a direct lookup's backward to finish, or runs autograd's as the lookup did
    (so a tied weight's two gradients always meet on one path, summed as autograd sums them)."""
    lookup = weight.__dict__.pop("_lookup_path", None)
    if lookup == "autograd" or not _direct(weight):
        return F.linear(h, weight)
    return _Head.apply(h, weight, lookup == "direct")


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        w = ctx.weight
        with torch.no_grad():
            rows, where = torch.unique(ids.flatten(), return_inverse=True)
            grad = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
            per_row = torch.zeros(len(rows), grad.shape[-1], dtype=w.dtype, device=w.device)
            per_row.index_add_(0, where, grad)
            head = w.__dict__.pop("_head_grad", None)
            if head is not None:
                _accumulate(w, head.index_add_(0, rows, per_row))
            else:
                if w.grad is None:
                    w.grad = zeroed_grad(w)
                w.grad.index_add_(0, rows, per_row)
        return None, None


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, tied_lookup_follows: bool) -> torch.Tensor:
        ctx.weight, ctx.tied = weight, tied_lookup_follows
        ctx.save_for_backward(h)
        return F.linear(h, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        w = ctx.weight
        g2 = grad.reshape(-1, grad.shape[-1])
        # the same two matmuls as autograd's linear backward, operands in the same layouts
        grad_h = g2.mm(w.detach()).view(h.shape)
        with torch.no_grad():
            grad_w = g2.t().mm(h.reshape(-1, h.shape[-1])).to(w.dtype)
            if ctx.tied:
                w._head_grad = grad_w
            else:
                _accumulate(w, grad_w)
        return grad_h, None, None


def _accumulate(w: torch.Tensor, g: torch.Tensor) -> None:
    """What AccumulateGrad does with a fresh gradient nothing else holds: take it, or add it in place."""
    if w.grad is None:
        w.grad = g
    else:
        w.grad.add_(g)
