"""alpha * x W^T (+ b) with the scale riding in the GEMM's alpha, forward and backward.

EST rescales a sliced row-parallel layer's output by N / k (and a sampled layer's branch by its layer scale).
As `F.linear(x, w) * alpha` that is one more pass over the [tokens, out] output in the forward and another over
its gradient in the backward; BLAS applies alpha inside the product for free (torch's own addmm backward would
multiply its gradients in separate passes again). Both gradients are alpha times the unscaled ones, computed as
such in the GEMM; the weight's gradient comes out in the weight's layout (a column-major weight,
parallel/storage.py, gets a column-major gradient), as autograd's mm backward gives it.

Under autocast F.linear's casting rules apply, so the plain expression runs there instead.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_est.parallel.storage import column_major


def scaled_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    """alpha * F.linear(x, w) + bias."""
    if alpha == 1.0:
        return F.linear(x, w, bias)
    if torch.is_autocast_enabled(x.device.type) or x.dtype != w.dtype:
        y = F.linear(x, w) * alpha
        return y if bias is None else y + bias
    return _ScaledLinear.apply(x, w, bias, alpha)


def _gemm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * a @ b in one BLAS call (beta = 0: the zero `self` is not read)."""
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=alpha)


class _ScaledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.alpha = alpha
        x2 = x.flatten(0, -2)  # (not reshape(-1, k): k may be 0, a shard that kept no unit)
        y = _gemm(x2, w.t(), alpha) if bias is None else torch.addmm(bias, x2, w.t(), alpha=alpha)
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        alpha = ctx.alpha
        g2 = grad.flatten(0, -2)
        x2 = x.flatten(0, -2)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _gemm(g2, w, alpha).view(x.shape)
        if ctx.needs_input_grad[1]:  # in w's layout: (x^T g)^T for a column-major w
            gw = _gemm(x2.t(), g2, alpha).t() if column_major(w) else _gemm(g2.t(), x2, alpha)
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None
