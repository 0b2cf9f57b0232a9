"""The flat data-parallel gradient buffer (parallel/grad_buffer.py): views in each parameter's layout, buckets
that are single slices, gradients copied in or written straight into their pieces."""
import pytest
import torch
import torch.nn as nn

from megatron_est.parallel.grad_buffer import GradBuffer
from megatron_est.parallel.sliced_grad import sliced_weight
from megatron_est.parallel.storage import column_major, column_major_copy


def _params():
    a = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(column_major_copy(torch.randn(5, 6)))  # a row-parallel weight's storage
    c = nn.Parameter(torch.randn(7))
    d = nn.Parameter(torch.randn(2, 2, dtype=torch.float64))
    return a, b, c, d


def test_views_tile_the_buffer_in_each_parameters_layout():
    a, b, c, d = _params()
    buf = GradBuffer([a, b, c, d])
    assert buf.flat[(torch.float32, a.device)].numel() == 12 + 30 + 7
    assert buf.flat[(torch.float64, d.device)].numel() == 4
    assert column_major(b.grad_bucket_view) and b.grad_bucket_view.stride() == b.stride()
    for i, p in enumerate((a, b, c)):
        p.grad_bucket_view.fill_(i + 1)
    flat = buf.flat[(torch.float32, a.device)]
    assert torch.equal(flat, torch.cat([torch.full((12,), 1.0), torch.full((30,), 2.0), torch.full((7,), 3.0)]))
    buf.release()
    assert not hasattr(a, "grad_bucket_view")


def test_runs_are_slices_cut_at_gaps_dtypes_and_size():
    a, b, c, d = _params()
    buf = GradBuffer([a, b, c, d])
    assert buf.runs([a, b, c, d], 100) == [[a, b, c], [d]]
    assert buf.runs([a, c], 100) == [[a], [c]]  # b (a skipped layer) lies between
    assert buf.runs([a, b, c], 42) == [[a, b], [c]]
    assert buf.runs([b], 1) == [[b]]  # larger than the cap: alone
    assert buf.slice([a, b]).numel() == 42 and buf.slice([c]).data_ptr() == c.grad_bucket_view.data_ptr()


def test_adopt_copies_a_gradient_made_elsewhere_and_binds_the_piece():
    a, b, c, d = _params()
    buf = GradBuffer([a, b, c, d])
    want = torch.randn(5, 6)
    b.grad = want.clone()  # row-major, as a fresh autograd gradient may be
    buf.adopt(b)
    assert b.grad.data_ptr() == b.grad_bucket_view.data_ptr() and torch.equal(b.grad, want)
    b.grad.add_(1.0)  # a later micro-batch accumulates in place: into the buffer
    assert torch.equal(buf.slice([b]).view(6, 5).t(), want + 1.0)
    buf.adopt(b)  # already bound: nothing changes
    assert torch.equal(b.grad, want + 1.0)


def test_direct_gradients_are_written_into_the_piece():
    w = nn.Parameter(torch.randn(6, 4))
    buf = GradBuffer([w])
    w.grad_bucket_view.fill_(123.0)  # last step's bytes: zeroed before the first add
    index = torch.tensor([0, 3, 4])
    sliced_weight(w, 0, index).sum().backward()
    assert w.grad.data_ptr() == buf.flat[(torch.float32, w.device)].data_ptr()
    want = torch.zeros(6, 4)
    want[index] = 1.0
    assert torch.equal(w.grad, want)


def test_a_parameter_neither_row_nor_column_major_is_refused():
    p = nn.Parameter(torch.randn(4, 6)[:, ::2])
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        GradBuffer([p])
