"""Parameters outside the step's subnetwork under DeepSpeed: their gradients inside ZeRO's buffers, and
--est-unsampled-update freeze (est/unsampled.py), the same algorithm as the plain engine's.

freeze: the frozen elements of a step (est.unsampled.frozen_elements) are found in the optimizer's own fp32 copies
and written back right after each step of the base optimizer, before DeepSpeed copies its fp32 partitions into
the module's weights (so bf16/fp16 weights follow).

Where DeepSpeed 0.19 keeps a parameter's elements (read from its runtime/zero and bf16_optimizer code):
- ZeRO-1/2, and DeepSpeed's bf16 optimizer without ZeRO: elements [lp.start, lp.start + n) of the flattened
  parameter live at [hp.start, hp.start + n) of its group's flat fp32 partition (param._hp_mapping's
  lp/hp fragment addresses); a parameter with no elements on this rank has no mapping.
- ZeRO-3: the flattened parameter, padded, is cut into data-parallel partitions of P elements (P =
  param.partition_numel()); this rank's partition lives at grad_position's offset in its sub-group's flat fp32
  partition.
- No ZeRO in fp32: the client optimizer steps the parameters themselves.
The moments are the base optimizer's state of the flat partition, viewed at the same region.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from megatron_est.est.unsampled import Fragment, Frozen, Hold, frozen_elements, full_shape, torch_fragments
from megatron_est.model.plan import ModelPlan


def zero_stale_gradients(run, params: list[torch.nn.Parameter]) -> None:
    """Give parameters that produced no gradient this step a zero gradient inside DeepSpeed's buffers.

    ZeRO-3 keeps per-parameter gradient partitions across steps, and so does ZeRO-1/2 with the optimizer
    offloaded (its CPU fp32 gradient buffer): both would otherwise hand the optimizer the stale gradient of the
    last step the parameter ran. ZeRO-1/2 without offload already hand zeros. Without ZeRO (stage 0) the
    optimizer sees p.grad directly, and torch's AdamW skips a parameter whose gradient is None instead of
    applying momentum and weight decay as the plain engine does: those get a zero gradient. Call after the last
    backward of the step, before engine.step(); every rank calls it with the same parameters (no communication).
    """
    if not params:
        return
    from deepspeed.utils import safe_set_full_grad, safe_set_local_grad  # deepspeed is imported lazily

    if run.stage == 3:
        for p in params:
            safe_set_local_grad(p, torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=p.ds_tensor.device))
    elif run.offload:
        for p in params:
            if getattr(p, "_hp_mapping", None) is not None:  # only the fragment this rank owns
                safe_set_full_grad(p, torch.zeros(p.shape, dtype=torch.float32, device=p.device))
    elif run.stage == 0:  # no ZeRO: the optimizer sees p.grad, and skips (rather than decays) a None gradient
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)


@contextlib.contextmanager
def frozen_during_step(run, module, plan: Optional[ModelPlan]):
    """Around the engine.step() that ends an optimizer step: under freeze, the plan's frozen elements are
    held and written back inside it (run.freeze is None under adamw)."""
    if run.freeze is not None:
        run.freeze.hold(frozen_elements(module, plan))
    try:
        yield
    finally:
        if run.freeze is not None:
            run.freeze.release()


def _flat(param: torch.nn.Parameter, frozen: Frozen, start: int, numel: int) -> Frozen:
    """The frozen elements among [start, start + numel) of the flattened parameter, as flat indices into that
    region (positions beyond the parameter, ZeRO-3's padding, are never frozen). Computed from the frozen rows or
    columns without building a mask of the whole parameter."""
    shape = full_shape(param)
    total = shape.numel()
    if frozen.index is None:
        return frozen if start + numel <= total else Frozen(0, torch.arange(max(0, total - start)))
    index = frozen.index.cpu()
    cols = shape[1] if len(shape) == 2 else 1
    first, last = start // cols, (min(start + numel, total) - 1) // cols  # rows the region touches
    if len(shape) == 1:
        pos = index
    elif frozen.dim == 0:
        rows = index[(index >= first) & (index <= last)]
        pos = (rows[:, None] * cols + torch.arange(cols)).reshape(-1)
    else:
        pos = (torch.arange(first, last + 1)[:, None] * cols + index[None, :]).reshape(-1)
    pos = pos[(pos >= start) & (pos < start + numel)] - start
    return Frozen(0, pos.to(frozen.index.device))


def _zero12_fragments(zero, base, frozen: dict) -> list[Fragment]:
    groups = getattr(zero, "bit16_groups", None) or zero.bf16_groups
    flats = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_groups_flat_partition
    group_of = {id(p): i for i, group in enumerate(groups) for p in group}
    out = []
    for p, f in frozen.items():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # none of this parameter's elements are in this rank's partition
            continue
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        out.append(Fragment(flats[group_of[id(p)]], base.state, _flat(p, f, lp.start, lp.numel),
                            (hp.start, hp.numel)))
    return out


def _zero3_fragments(zero, base, frozen: dict, dp_rank: int) -> list[Fragment]:
    out = []
    for p, f in frozen.items():
        group, offset, numel = zero.grad_position[zero.get_param_id(p)]
        out.append(Fragment(zero.fp32_partitioned_groups_flat[group], base.state,
                            _flat(p, f, dp_rank * p.partition_numel(), numel), (offset, numel)))
    return out


class DeepSpeedFreeze:
    """Holds the frozen elements of the current step across engine.step(): hold() before it, and a post-hook
    on the base optimizer restores them after every base step (ZeRO steps one group at a time)."""

    def __init__(self, engine, stage: int, dp_rank: int):
        self.stage, self.dp_rank = stage, dp_rank
        self.zero = engine.optimizer
        self.base = getattr(self.zero, "optimizer", self.zero)  # the torch optimizer that does the update
        self.current: Optional[Hold] = None
        for opt in {id(o): o for o in (self.base, getattr(self.zero, "backup_optimizer", None)) if o}.values():
            opt.register_step_post_hook(self._restore)

    def _fragments(self, frozen: dict) -> list[Fragment]:
        if self.stage == 3:
            return _zero3_fragments(self.zero, self.base, frozen, self.dp_rank)
        if self.base is self.zero:  # no ZeRO and no DeepSpeed bf16 optimizer: the parameters themselves
            return torch_fragments(self.base, frozen)
        return _zero12_fragments(self.zero, self.base, frozen)

    def hold(self, frozen: dict) -> None:
        """Call after the step's last backward, right before engine.step()."""
        self.current = Hold(self._fragments(frozen)) if frozen else None

    def release(self) -> None:
        """Call after engine.step()."""
        self.current = None

    def _restore(self, optimizer, *_) -> None:
        """After a base-optimizer step: write back the fragments of the flat partitions it just stepped."""
        if self.current is not None:
            stepped = {id(t) for g in optimizer.param_groups for t in g["params"]}
            self.current.restore(lambda f: id(f.tensor) in stepped)
