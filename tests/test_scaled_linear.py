"""scaled_linear (parallel/scaled_linear.py) against the plain expression alpha * F.linear(x, w) + b."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_est.parallel.scaled_linear import scaled_linear
from megatron_est.parallel.storage import column_major_copy


def _run(fn, x, w, b, alpha):
    x, w = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = fn(x, w, b, alpha)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g)
    return y, x.grad, w.grad, None if b is None else b.grad


def _reference(x, w, b, alpha):
    y = F.linear(x, w) * alpha
    return y if b is None else y + b


@pytest.mark.parametrize("alpha", [2.0, 4 / 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["row", "column"])
def test_scaled_linear_equals_scaled_output(alpha, bias, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=g)
    w = torch.randn(7, 12, generator=g)
    w = column_major_copy(w) if layout == "column" else w
    b = torch.randn(7, generator=g) if bias else None
    got, ref = _run(scaled_linear, x, w, b, alpha), _run(_reference, x, w, b, alpha)
    for name, a, r in zip(("output", "x grad", "w grad", "bias grad"), got, ref):
        if r is None:
            assert a is None
        elif alpha == 2.0 and not (name == "output" and bias):
            # A power-of-two scale is exact wherever it is applied. (Not the biased output: the bias joins the
            # GEMM's accumulator, and BLAS may add it at another point of the sum than `+ b` does.)
            assert torch.equal(a, r), name
        else:
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6, msg=name)
    assert got[2].stride() == w.stride()  # the gradient in the weight's own layout


def test_no_kept_unit_gives_zero_output_and_empty_gradients():
    """A TP shard that kept no head or neuron: an empty input dimension, still a [tokens, out] (zero) output."""
    x = torch.randn(2, 3, 0, requires_grad=True)
    w = column_major_copy(torch.randn(8, 0)).requires_grad_()
    y = scaled_linear(x, w, None, 2.0)
    assert y.shape == (2, 3, 8) and not y.any()
    y.sum().backward()
    assert x.grad.shape == (2, 3, 0) and w.grad.shape == (8, 0)
