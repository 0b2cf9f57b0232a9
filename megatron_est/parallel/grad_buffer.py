"""A data-parallel rank's gradients in one flat buffer per dtype: each parameter's .grad is a view of its piece.

The overlapped reduction (grad_overlap.py) all-reduces and averages slices of this buffer in place, so a bucket
needs no flattened copy and no copy back (Megatron's contiguous gradient buffer; DDP's gradient_as_bucket_view).
That is two passes over every gradient less, and one gradient-sized allocation less at the step's peak. Pieces lie
in the order given (reverse registration order: about the order backward finishes them), so a bucket of
consecutive parameters is one slice.

How a gradient lands in its piece:
- direct gradients (sliced weights, the embedding lookup) start from the zeroed piece and add into it:
  sliced_grad.zeroed_grad returns `p.grad_bucket_view` when the parameter has one;
- a gradient autograd made (it takes the first micro-batch's as is) is copied in by `adopt` from the parameter's
  post-accumulate-grad hook, and the piece becomes .grad, so later micro-batches add into the piece.
The buffer outlives the step: a caller who keeps last step's .grad past the next step's backward sees it change,
as with DDP's bucket views (clone it to keep it).
"""
from __future__ import annotations

import torch

from megatron_est.parallel.storage import column_major


class GradBuffer:
    def __init__(self, params: list[torch.nn.Parameter]):
        sizes: dict[tuple, int] = {}
        self.place: dict[torch.nn.Parameter, tuple[tuple, int]] = {}  # parameter -> (buffer key, offset)
        for p in params:
            key = (p.dtype, p.device)
            self.place[p] = (key, sizes.get(key, 0))
            sizes[key] = sizes.get(key, 0) + p.numel()
        self.flat = {key: torch.zeros(n, dtype=key[0], device=key[1]) for key, n in sizes.items()}
        for p in params:
            p.grad_bucket_view = self._view(p)

    def _view(self, p: torch.nn.Parameter) -> torch.Tensor:
        """p's piece, in p's own layout (a column-major weight gets a column-major gradient, parallel/storage.py)."""
        key, offset = self.place[p]
        piece = self.flat[key][offset:offset + p.numel()]
        if column_major(p):
            return piece.view(p.shape[1], p.shape[0]).t()
        if not p.is_contiguous():
            raise ValueError(f"a parameter of shape {tuple(p.shape)} and strides {p.stride()} is neither row- nor "
                             "column-major: it has no place in a flat gradient buffer")
        return piece.view(p.shape)

    def release(self) -> None:
        """Take the views off the parameters (their .grad, if a view, stays valid: it keeps the buffer alive)."""
        for p in self.place:
            p.__dict__.pop("grad_bucket_view", None)
        self.place, self.flat = {}, {}

    def adopt(self, p: torch.nn.Parameter) -> None:
        """Make p.grad its piece: copy a gradient that lives elsewhere into it (nothing to do when it is already)."""
        v = p.grad_bucket_view
        g = p.grad
        if g is None or (g.data_ptr() == v.data_ptr() and g.stride() == v.stride()):
            return
        v.copy_(g)
        p.grad = v

    def runs(self, params: list[torch.nn.Parameter], max_numel: int) -> list[list[torch.nn.Parameter]]:
        """`params` (in buffer order) cut into buckets that are each one slice: a bucket ends where the next
        parameter is not adjacent in the buffer (a skipped layer lies between), changes dtype, or would pass
        max_numel (a larger parameter stays alone)."""
        out: list[list[torch.nn.Parameter]] = []
        numel, end = 0, None
        for p in params:
            key, offset = self.place[p]
            if not out or (key, offset) != end or numel + p.numel() > max_numel:
                out.append([])
                numel = 0
            out[-1].append(p)
            numel += p.numel()
            end = (key, offset + p.numel())
        return out

    def slice(self, bucket: list[torch.nn.Parameter]) -> torch.Tensor:
        """The buffer slice holding a bucket of `runs`."""
        key, start = self.place[bucket[0]]
        _, last = self.place[bucket[-1]]
        return self.flat[key][start:last + bucket[-1].numel()]
