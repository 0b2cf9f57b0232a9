"""A weight's slice whose backward adds its gradient straight into the kept rows/columns of the weight's .grad.

Autograd's own index_select backward builds a full-size zero tensor, index_adds the slice into it and then
accumulates that into .grad (a second full-size add from the second micro-batch on): memory traffic and fresh
page-faulting allocations that do not shrink with the sampling rate. Here the gradient buffer is kept on the
parameter across steps (zeroed, not reallocated, when a step starts with grad None, and only while nothing else
holds it or a view of it: a caller may keep last step's gradient) and every micro-batch adds only its kept
rows/columns into it: the same values, bit for bit (each element receives the same additions in the same order),
zero outside the kept slices as before.

The weight then gets no autograd gradient of its own; autograd still runs its accumulation node (with nothing to
add) after this backward has written .grad, so post-accumulate-grad hooks fire once per backward with the final
.grad, as before. Hooks marked `fires_from_direct_grads` (the overlapped data-parallel reduction,
parallel/grad_overlap.py) rely on just that. Any other hook (DeepSpeed ZeRO registers post-accumulate-grad hooks
and may take .grad over), a ZeRO-3 partitioned parameter, or set_direct_grads(model, False) selects autograd's
path instead.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from megatron_est.parallel.storage import as_rows, select


def set_direct_grads(module: nn.Module, enabled: bool) -> None:
    """The one switch: direct accumulation (default) or autograd's full-size gradients for this module's
    parameters. Off also frees the kept buffers."""
    for p in module.parameters():
        p.direct_grads = enabled
        if not enabled and hasattr(p, "_direct_grad_buffer"):
            del p._direct_grad_buffer


def direct_grads_apply(p: torch.Tensor) -> bool:
    """Whether p's gradient may be written straight into .grad (the module docstring says when not)."""
    if not getattr(p, "direct_grads", True) or not p.requires_grad or not torch.is_grad_enabled():
        return False
    return all(getattr(h, "fires_from_direct_grads", False) for h in _hooks(p)) and not hasattr(p, "ds_id")


def _hooks(p: torch.Tensor) -> list:
    return list((getattr(p, "_post_accumulate_grad_hooks", None) or {}).values())


def sliced_weight(p: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """p.index_select(dim, index), with its gradient added into p.grad directly (see the module docstring)."""
    if not direct_grads_apply(p):
        return select(p, dim, index)
    return _SliceIntoGrad.apply(p, dim, index)


class _SliceIntoGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
        ctx.param, ctx.dim = p, dim
        ctx.save_for_backward(index)
        return select(p, dim, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        with torch.no_grad():
            accumulate_slice(ctx.param, ctx.dim, index, grad)
        return None, None, None


def accumulate_slice(p: torch.Tensor, dim: int, index: torch.Tensor, grad: torch.Tensor) -> None:
    """p.grad[index along dim] += grad, starting from zeros when p.grad is None. (Zeroing the whole buffer and
    adding is faster than writing the kept slices with index_copy_ and zeroing the others with index_fill_:
    0.80 ms against 1.95 ms for half the rows of a 3072 x 768 weight, one thread.)"""
    if p.grad is None:
        p.grad = zeroed_grad(p)
    v, d, transposed = as_rows(p.grad, dim)
    grad = grad.to(p.grad.dtype)
    v.index_add_(d, index, grad.t() if transposed else grad)


def zeroed_grad(p: torch.Tensor) -> torch.Tensor:
    """The parameter's kept gradient buffer, zeroed: its piece of the data-parallel gradient buffer when it has one
    (parallel/grad_buffer.py); else its own, a new one the first time, if its layout changed, or if anyone else
    still holds it."""
    view = p.__dict__.get("grad_bucket_view")
    if view is not None:
        return view.zero_()
    buf = p.__dict__.get("_direct_grad_buffer")
    if buf is not None and _sole_owner(buf) and _same_layout(buf, p):
        return buf.zero_()
    buf = torch.zeros_like(p)  # in p's layout (strides), as autograd's accumulation keeps it
    p._direct_grad_buffer = buf
    return buf


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device)


def _sole_owner(buf: torch.Tensor) -> bool:
    # Python references: the parameter's attribute, the caller's local, ours and getrefcount's argument. Storage
    # references: this tensor and the storage object looked at here (a view, or any tensor sharing the storage,
    # counts one more).
    storage = buf.untyped_storage()
    return sys.getrefcount(buf) <= 4 and torch._C._storage_Use_Count(storage._cdata) == 2
