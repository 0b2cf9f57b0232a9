"""Cross-entropy over logits whose vocabulary is split across tensor-parallel ranks.

Never gathers the full [tokens, vocab] logits: only per-token max, target logit and sum of exps are reduced.
Both functions keep one [tokens, vocab] fp32 tensor for the backward (the softmax, or its log) and turn it into
the gradient in place, as Megatron's does: the backward runs once per forward (no retain_graph double backward).

Columns of the padded vocabulary (global id >= vocab_size) take no probability mass: they are set to -inf here,
in the fp32 logits (in place when the logits are fp32: the LM head's fresh output, which nothing else holds), and so
get a zero gradient. A -inf bias on the LM head did the same at the cost of copying the bias into every
[tokens, vocab] output before the matmul.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group, vocab_start: int, n_real: int):
        logits = _mask_padding(logits.float(), n_real)
        local_max = logits.max(dim=-1).values
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - local_max.unsqueeze(-1)
        n_local = logits.shape[-1]
        local_t = target - vocab_start
        outside = (local_t < 0) | (local_t >= n_local)
        local_t = local_t.masked_fill(outside, 0)
        picked = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        stats = torch.stack([picked, sum_exp])
        dist.all_reduce(stats, group=group)
        picked, sum_exp = stats[0], stats[1]
        loss = sum_exp.log() - picked
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_t, outside = ctx.saved_tensors
        grad = softmax
        inside = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -inside.unsqueeze(-1))
        return grad.mul_(grad_loss.unsqueeze(-1)), None, None, None, None


class _CrossEntropy(torch.autograd.Function):
    """One rank's whole vocabulary. The loss is F.cross_entropy's, bit for bit (torch's log_softmax, then the
    target's entry); the backward is exp(log_softmax) - one_hot, scaled, written over the saved log-softmax.
    torch's own backward builds a zero [tokens, vocab] tensor for nll_loss and then a new one for log_softmax's
    gradient (bench/bench_cross_entropy.py times both)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, n_real: int):
        log_sm = torch.log_softmax(_mask_padding(logits.float(), n_real), dim=-1)
        ctx.save_for_backward(log_sm, target)
        return log_sm.gather(-1, target.unsqueeze(-1)).squeeze(-1).neg_()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        log_sm, target = ctx.saved_tensors
        grad = log_sm.exp_()
        grad.scatter_add_(-1, target.unsqueeze(-1), torch.full_like(target, -1, dtype=grad.dtype).unsqueeze(-1))
        return grad.mul_(grad_loss.unsqueeze(-1)), None, None


def _mask_padding(logits: torch.Tensor, n_real: int) -> torch.Tensor:
    if n_real < logits.shape[-1]:
        logits[..., n_real:] = float("-inf")
    return logits


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group, tp: int,
                                 vocab_start: int, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token loss [..] from local logits [.., V/tp] and global target ids [..]; vocabulary ids from
    vocab_size on (None: none) are padding."""
    n_local = logits.shape[-1]
    n_real = n_local if vocab_size is None else min(max(vocab_size - vocab_start, 0), n_local)
    if tp == 1:
        return _CrossEntropy.apply(logits.flatten(0, -2), target.flatten(), n_real).view(target.shape)
    return _VocabParallelCE.apply(logits, target, group, vocab_start, n_real)
