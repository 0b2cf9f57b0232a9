"""What the optimizer does to parameters outside the step's subnetwork (--est-unsampled-update), as one policy
object chosen per run, the same algorithm in every engine (plain torch, DeepSpeed ZeRO 0-3) and layout.

"adamw": they get a zero gradient, so AdamW still moves them by momentum and weight decay.
"freeze" (the default): they and their AdamW moments are left exactly as
they were. Every element takes an ordinary AdamW step on a gradient that is zero outside the subnetwork, and the
elements the step's plan did not train (the model says which: LanguageModel.trained_slices and
skipped_parameters) get their value and moments written back right after the optimizer's update. Done on the
optimizer's own copy (a ZeRO flat fp32 partition, or the parameter itself), so bf16/fp16 weights follow.
Step counts: AdamW's bias correction uses one step count per tensor (per flat partition under ZeRO), which
advances every step for every element, trained or not: 1 - beta**t with the global step t. This is our documented
equivalent of per-element step counts; the two differ only while beta2**t is not negligible (about the first
100 steps at beta2 = 0.95), when a frozen element's moments are still mostly their zero start.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_est.config import Config
from megatron_est.model.plan import ModelPlan
from megatron_est.parallel.grads import zero_fill_missing_grads

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def full_shape(p: torch.nn.Parameter) -> torch.Size:
    """The parameter's shape, also where ZeRO-3 has emptied p.data between uses (it keeps the shape in ds_shape)."""
    return getattr(p, "ds_shape", p.shape)


def frozen_masks(model, plan: Optional[ModelPlan]) -> dict[torch.nn.Parameter, torch.Tensor]:
    """For every parameter of this stage that the plan does not train in full: a bool mask, broadcastable to the
    parameter, True where an element is outside the subnetwork (all of a skipped layer; the unsampled rows or
    columns of a sliced weight)."""
    if plan is None:
        return {}
    masks = {p: torch.ones((1,) * len(full_shape(p)), dtype=torch.bool, device=p.device)
             for p in model.skipped_parameters(plan)}
    for p, dim, kept in model.trained_slices(plan):
        m = torch.ones(full_shape(p)[dim], dtype=torch.bool, device=p.device)
        m[kept] = False
        shape = [1] * len(full_shape(p))
        shape[dim] = -1
        masks[p] = m.view(shape)
    return masks


@dataclass
class Fragment:
    """Where an optimizer keeps (part of) one parameter: `tensor` is the tensor it steps (the parameter itself, or
    a flat partition holding the parameter's elements at `region` = (offset, numel)), `state` its optimizer.state."""
    tensor: torch.Tensor
    state: dict
    mask: torch.Tensor  # frozen elements, broadcastable to the viewed region
    region: Optional[tuple[int, int]] = None

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.region is None else t.narrow(0, *self.region)

    def moments(self) -> list[torch.Tensor]:
        st = self.state.get(self.tensor, {})
        return [self.view(st[k]) for k in _MOMENTS if k in st]


class Hold:
    """The frozen elements of one step: saved at construction (before the optimizer step), written back by
    restore() (after it). restore() may run several times (ZeRO steps one parameter group at a time)."""

    @torch.no_grad()
    def __init__(self, fragments: list[Fragment]):
        self.fragments = fragments
        self.saved = [(self._select(f.view(f.tensor), f.mask), [self._select(m, f.mask) for m in f.moments()])
                      for f in fragments]

    @staticmethod
    def _select(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return t.masked_select(mask.to(t.device))

    @torch.no_grad()
    def restore(self) -> None:
        for f, (value, moments) in zip(self.fragments, self.saved):
            mask = f.mask.to(f.tensor.device)
            f.view(f.tensor).masked_scatter_(mask, value)
            now = f.moments()
            if moments:
                for m, old in zip(now, moments):
                    m.masked_scatter_(mask, old)
            else:  # the first step created the moments: the frozen elements keep their zero start
                for m in now:
                    m.masked_fill_(mask, 0.0)


def torch_fragments(optimizer: torch.optim.Optimizer, masks: dict) -> list[Fragment]:
    """Fragments for an optimizer that steps the parameters themselves (plain engine, DeepSpeed without ZeRO)."""
    return [Fragment(p, optimizer.state, m) for p, m in masks.items()]


class AdamWUpdate:
    """Unsampled parameters get zero gradients and an ordinary AdamW step."""
    name = "adamw"

    def complete_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Before clipping: every parameter gets a gradient (zeros where the subnetwork did not reach)."""
        zero_fill_missing_grads(params)

    def step(self, optimizer: torch.optim.Optimizer, model, plan: Optional[ModelPlan]) -> None:
        optimizer.step()


class FreezeUpdate:
    """Unsampled parameters and their AdamW moments stay untouched."""
    name = "freeze"

    def complete_grads(self, params: list[torch.nn.Parameter]) -> None:
        zero_fill_missing_grads(params)  # every element steps (and counts the step); frozen ones are restored

    def step(self, optimizer: torch.optim.Optimizer, model, plan: Optional[ModelPlan]) -> None:
        hold = Hold(torch_fragments(optimizer, frozen_masks(model, plan)))
        optimizer.step()
        hold.restore()


def unsampled_policy(cfg: Config):
    """The run's policy: FreezeUpdate or AdamWUpdate, from --est-unsampled-update."""
    return FreezeUpdate() if cfg.est.unsampled_update == "freeze" else AdamWUpdate()
