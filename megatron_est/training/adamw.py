"""torch's fused AdamW, stepping column-major parameters through their contiguous transposes.

The row-parallel weights are stored column by column (parallel/storage.py). torch's fused AdamW kernel copies a
non-contiguous parameter, its gradient and both moments to contiguous tensors and back: a GPT-2 124M step on one
CPU thread took 1.43x as long as on row-major parameters, and 0.98x stepped this way (bench/bench_layout.py).
AdamW is elementwise, so for the step each such parameter, its gradient and moments are swapped for their
transposes, which are contiguous views of the same memory, and swapped back after: the same update, element for
element, with no copy. The optimizer and its state dict are torch's (isinstance checks, checkpoints and the
FusedAdam state conversion see torch.optim.AdamW).
"""
from __future__ import annotations

import contextlib

import torch

from megatron_est.est.unsampled import ADAM_MOMENTS
from megatron_est.parallel.storage import column_major


class AdamW(torch.optim.AdamW):
    """The swap runs in the step's own pre- and post-hooks: overriding step() would fire the hooks twice once
    torch has wrapped both classes' step (it wraps a class's step when its first optimizer is built)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._swapped = contextlib.ExitStack()
        self.register_step_pre_hook(_swap_in)
        self.register_step_post_hook(_swap_back)


def _swap_in(opt: AdamW, args, kwargs) -> None:
    for p in (p for g in opt.param_groups for p in g["params"] if column_major(p)):
        opt._swapped.enter_context(_transposed(p, opt.state[p]))


def _swap_back(opt: AdamW, args, kwargs) -> None:
    opt._swapped.close()


@contextlib.contextmanager
def _transposed(p: torch.nn.Parameter, state: dict):
    """p, p.grad and the moments as [in, out] contiguous views for the duration; the original tensor objects
    are put back after (the direct-gradient buffer is recognised by identity: parallel/sliced_grad.py)."""
    value, grad = p.data, p.grad
    moments = {}
    for k in ADAM_MOMENTS:
        if k in state:
            if state[k].stride() != p.stride():  # e.g. a checkpoint saved with row-major moments
                state[k] = torch.empty_like(p).copy_(state[k])
            moments[k] = state[k]
            state[k] = state[k].t()
    p.grad = None  # (a gradient must match the parameter's shape when assigned)
    p.data = value.t()
    p.grad = None if grad is None else grad.t()
    try:
        yield
    finally:
        for k in ADAM_MOMENTS:
            if k in state:  # the step may have created them, as [in, out] contiguous tensors
                state[k] = moments.get(k, state[k].t())
        p.grad = None
        p.data = value
        p.grad = grad
