"""The one-rank cross-entropy (parallel/cross_entropy.py) against torch's F.cross_entropy: the same loss bit for
bit, the same gradient to rounding, for fp32 and bf16 logits and a weighted per-token backward. (The TP > 1
function is checked against one process by the layout tests: tests/test_tensor_parallel.py and tests/test_pipeline.py.)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_est.parallel.cross_entropy import vocab_parallel_cross_entropy


def _pair(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 7, 301, generator=g)).to(dtype)
    target = torch.randint(0, 301, (2, 7), generator=g)
    weight = torch.rand(2, 7, generator=g)  # a loss mask / per-token scale, as the training loss applies
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(ours, target, None, 1, 0)
    ref_loss = F.cross_entropy(ref.float().flatten(0, -2), target.flatten(), reduction="none").view(target.shape)
    (loss * weight).sum().backward()
    (ref_loss * weight).sum().backward()
    return loss, ref_loss, ours.grad, ref.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_rank_cross_entropy_matches_torch(dtype):
    loss, ref_loss, grad, ref_grad = _pair(dtype)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert torch.equal(loss, ref_loss)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)


def test_gradient_is_softmax_minus_one_hot():
    """By hand, independent of torch's backward: d loss_i / d logits_i = softmax(logits_i) - one_hot(target_i)."""
    logits = torch.tensor([[1.0, 2.0, 0.5]], requires_grad=True)
    vocab_parallel_cross_entropy(logits, torch.tensor([1]), None, 1, 0).sum().backward()
    e = torch.tensor([1.0, 2.0, 0.5]).exp()
    expected = e / e.sum() - torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(logits.grad[0], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_vocabulary_takes_no_mass(dtype):
    """Ids from vocab_size on are padding: the loss is F.cross_entropy over the real columns alone, bit for bit,
    and the padding columns get a zero gradient, whatever their logits held."""
    g = torch.Generator().manual_seed(1)
    real, padded = 301, 320
    logits = (3 * torch.randn(2, 7, padded, generator=g)).to(dtype)
    target = torch.randint(0, real, (2, 7), generator=g)
    ours = logits.clone().requires_grad_()
    ref = logits[..., :real].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(ours.clone(), target, None, 1, 0, real)
    ref_loss = F.cross_entropy(ref.float().flatten(0, -2), target.flatten(), reduction="none").view(target.shape)
    assert torch.equal(loss, ref_loss)
    loss.sum().backward()
    ref_loss.sum().backward()
    assert torch.equal(ours.grad[..., real:], torch.zeros_like(ours.grad[..., real:]))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.grad[..., :real], ref.grad, rtol=tol, atol=tol)
