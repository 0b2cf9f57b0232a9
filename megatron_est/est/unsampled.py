"""What the optimizer does to parameters outside the step's subnetwork (--est-unsampled-update), as one policy
object chosen per run, the same algorithm in every engine (plain torch, DeepSpeed ZeRO 0-3) and layout.

"adamw" (the default): they get a zero gradient, so AdamW still moves them by momentum and weight decay.
"freeze": they and their AdamW moments are left exactly as they were. Defined as: every element
takes an ordinary AdamW step on a gradient that is zero outside the subnetwork, and the elements the step's plan
did not train (the model says which: LanguageModel.trained_slices and skipped_parameters) get their value and
moments written back right after the optimizer's update, in the optimizer's own copy (a ZeRO flat fp32
partition, or the parameter itself), so bf16/fp16 weights follow. The plain engine gets the same result more
cheaply: a skipped layer sits the step out and only counts it, and a sliced weight is stepped on compact copies
of its kept rows/columns (value, gradient, moments; Narrowed below), so its frozen elements are never touched
and the optimizer's work shrinks with the sampling rate. The optimizer's own update runs on those copies, so the
kept elements get the same arithmetic (bit for bit with the multi-tensor kernels; torch's fused CPU kernel
vectorises by position in the tensor and may differ in the last bit of a moment).
Step counts: AdamW's bias correction uses one step count per tensor (per flat partition under ZeRO), which
advances every step for every element, trained or not: 1 - beta**t with the global step t. This is our documented
equivalent of per-element step counts; the two differ only while beta2**t is not negligible (about the first
100 steps at beta2 = 0.95), when a frozen element's moments are still mostly their zero start.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from megatron_est.config import Config
from megatron_est.model.plan import ModelPlan
from megatron_est.parallel.grads import zero_fill_missing_grads
from megatron_est.parallel.storage import index_copy, select

# the per-element state of torch's Adam/AdamW (training/adamw.py swaps it too)
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def full_shape(p: torch.nn.Parameter) -> torch.Size:
    """The parameter's shape, also where ZeRO-3 has emptied p.data between uses (it keeps the shape in ds_shape)."""
    return getattr(p, "ds_shape", p.shape)


class Frozen(NamedTuple):
    """The elements of one parameter that a step does not train: indices along `dim`, or all (index None)."""
    dim: int
    index: Optional[torch.Tensor]

    def mask(self, shape: torch.Size) -> torch.Tensor:
        """The same as a bool tensor of the parameter's shape (True: frozen)."""
        if self.index is None:
            return torch.ones(shape, dtype=torch.bool)
        m = torch.zeros(shape[self.dim], dtype=torch.bool)
        m[self.index.cpu()] = True
        view = [1] * len(shape)
        view[self.dim] = -1
        return m.view(view).expand(shape)


def frozen_elements(model, plan: Optional[ModelPlan]) -> dict[torch.nn.Parameter, Frozen]:
    """Every parameter of this stage that the plan does not train in full, with its frozen elements: all of a
    skipped layer's, the unsampled rows or columns of a sliced weight."""
    if plan is None:
        return {}
    frozen = {p: Frozen(0, None) for p in model.skipped_parameters(plan)}
    for p, dim, kept in model.trained_slices(plan):
        keep = torch.zeros(full_shape(p)[dim], dtype=torch.bool, device=kept.device)
        keep[kept] = True
        frozen[p] = Frozen(dim, (~keep).nonzero().squeeze(1))
    return frozen


@dataclass
class Fragment:
    """Where an optimizer keeps (part of) one parameter: `tensor` is the tensor it steps (the parameter itself, or
    a flat partition holding the parameter's elements at `region` = (offset, numel)), `state` its optimizer.state;
    `frozen` says which elements of the viewed tensor (or region) to hold."""
    tensor: torch.Tensor
    state: dict
    frozen: Frozen
    region: Optional[tuple[int, int]] = None

    def view(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.region is None else t.narrow(0, *self.region)

    def moments(self) -> list[torch.Tensor]:
        st = self.state.get(self.tensor, {})
        return [self.view(st[k]) for k in ADAM_MOMENTS if k in st]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        dim, index = self.frozen
        return t.clone() if index is None else select(t, dim, index.to(t.device))

    def put(self, t: torch.Tensor, values: Optional[torch.Tensor]) -> None:
        """Write `values` (zeros when None) back into the frozen elements of t."""
        dim, index = self.frozen
        if index is None:
            t.copy_(values) if values is not None else t.zero_()
        elif values is not None:
            index_copy(t, dim, index.to(t.device), values)
        else:
            t.index_fill_(dim, index.to(t.device), 0.0)


class Hold:
    """The frozen elements of one step: saved at construction (before the optimizer step), written back by
    restore() (after it; ZeRO steps one parameter group at a time and restores the fragments of each)."""

    @torch.no_grad()
    def __init__(self, fragments: list[Fragment]):
        self.fragments = fragments
        self.saved = [(f.take(f.view(f.tensor)), [f.take(m) for m in f.moments()]) for f in fragments]

    @torch.no_grad()
    def restore(self, which: Optional[Callable[[Fragment], bool]] = None) -> None:
        """Write the saved elements back (into the fragments `which` accepts: all by default)."""
        for f, (value, moments) in zip(self.fragments, self.saved):
            if which is not None and not which(f):
                continue
            f.put(f.view(f.tensor), value)
            now = f.moments()
            if moments:
                for m, old in zip(now, moments):
                    f.put(m, old)
            else:  # the first step created the moments: the frozen elements keep their zero start
                for m in now:
                    f.put(m, None)


def torch_fragments(optimizer: torch.optim.Optimizer, frozen: dict) -> list[Fragment]:
    """Fragments for an optimizer that steps the parameters themselves (plain engine, DeepSpeed without ZeRO)."""
    return [Fragment(p, optimizer.state, f) for p, f in frozen.items()]


class AdamWUpdate:
    """Unsampled parameters get zero gradients and an ordinary AdamW step."""
    name = "adamw"

    def complete_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Before the optimizer's step (after clipping: zeros change neither the norm nor the clip): every
        parameter gets a gradient (zeros where the subnetwork did not reach)."""
        zero_fill_missing_grads(params)

    def step(self, optimizer: torch.optim.Optimizer, model, plan: Optional[ModelPlan]) -> None:
        optimizer.step()


class FreezeUpdate:
    """Unsampled parameters and their AdamW moments stay untouched. narrow=False steps sliced weights whole and
    writes their frozen elements back (the defining route; bench/bench_est_step.py times both)."""
    name = "freeze"

    def __init__(self, narrow: bool = True):
        self.narrow = narrow

    def complete_grads(self, params: list[torch.nn.Parameter]) -> None:
        pass  # skipped layers keep grad None: no data-parallel traffic, and step() below handles them

    def step(self, optimizer: torch.optim.Optimizer, model, plan: Optional[ModelPlan]) -> None:
        """The same result as stepping everything and writing the frozen elements back (what ZeRO's flat
        partitions need, training/deepspeed_unsampled.py), cheaper: a skipped parameter that already has
        optimizer state sits the step out (AdamW skips a None gradient) and only counts it; a sliced one with
        state steps its kept slices alone (Narrowed). Parameters without state yet (the first steps) take the
        defining route: a full step on a zero-filled gradient, then the write-back, so AdamW creates the state."""
        narrowed = [Narrowed(p, optimizer.state[p], dim, kept) for p, dim, kept in _slices(model, plan)
                    if self.narrow and p.grad is not None and optimizer.state.get(p)]
        done = {n.param for n in narrowed}
        frozen = {p: f for p, f in frozen_elements(model, plan).items() if p not in done}
        sit_out = [p for p, f in frozen.items() if f.index is None and p.grad is None and optimizer.state.get(p)]
        for p in sit_out:
            del frozen[p]
        for p in frozen:
            if p.grad is None:  # never stepped yet: let AdamW create its state, then write it back
                p.grad = torch.zeros_like(p)
        hold = Hold(torch_fragments(optimizer, frozen))
        with contextlib.ExitStack() as stack:
            for n in narrowed:
                stack.enter_context(n)
            optimizer.step()
        hold.restore()
        for p in sit_out:  # torch's AdamW counts per tensor; FusedAdam counts per group, for every tensor
            if "step" in optimizer.state[p]:
                optimizer.state[p]["step"] += 1


def _slices(model, plan: Optional[ModelPlan]) -> list:
    return [] if plan is None else model.trained_slices(plan)


class Narrowed:
    """For the optimizer's step (a context), a sliced parameter is a compact copy of its kept rows/columns:
    its value, gradient and moments are swapped for kept-slice copies, and the results are scattered back on
    exit. Any Adam implementation that reads p, p.grad and state[p] (torch's, apex's FusedAdam) then updates
    just those elements; its step count is the tensor's own, advanced as usual."""

    def __init__(self, param: torch.nn.Parameter, state: dict, dim: int, kept: torch.Tensor):
        self.param, self.state, self.dim, self.kept = param, state, dim, kept

    @torch.no_grad()
    def __enter__(self) -> "Narrowed":
        p, dim = self.param, self.dim
        self.kept = self.kept.to(p.device)
        self.value, self.grad = p.data, p.grad
        self.moments = {k: self.state[k] for k in ADAM_MOMENTS if k in self.state}
        p.grad = None  # (a gradient must match the parameter's shape when assigned)
        p.data = select(self.value, dim, self.kept)  # (compact copies in the tensor's layout: parallel/storage.py)
        p.grad = select(self.grad, dim, self.kept)
        for k, m in self.moments.items():
            self.state[k] = select(m, dim, self.kept)
        return self

    @torch.no_grad()
    def __exit__(self, *exc) -> None:
        p, dim, kept = self.param, self.dim, self.kept
        index_copy(self.value, dim, kept, p.data)
        for k, m in self.moments.items():
            index_copy(m, dim, kept, self.state[k])
            self.state[k] = m
        p.grad = None
        p.data = self.value
        p.grad = self.grad


def unsampled_policy(cfg: Config):
    """The run's policy: FreezeUpdate or AdamWUpdate, from --est-unsampled-update."""
    return FreezeUpdate() if cfg.est.unsampled_update == "freeze" else AdamWUpdate()
