"""What the optimizer does to parameters outside the step's subnetwork (--est-unsampled-update), as one policy
object chosen per run.

"adamw": they get a zero gradient, so AdamW still moves them by momentum and weight decay and every parameter's
step count advances every step (what ZeRO does, so the only mode under --deepspeed).
"freeze" (the default on the plain engine, via "auto"; config.unsampled_update): they and their AdamW moments
are left exactly as they were. Skipped layers keep grad None, which torch's AdamW skips outright; for sliced
weights (the model says which: LanguageModel.trained_slices) the unsampled rows/columns and their exp_avg /
exp_avg_sq are saved before optimizer.step() and written back after. Caveat: AdamW's step count (bias
correction) is per tensor, so it still advances for a tensor of which only some rows trained.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_est.config import Config, unsampled_update
from megatron_est.model.plan import ModelPlan
from megatron_est.parallel.grads import zero_fill_missing_grads

_MOMENTS = ("exp_avg", "exp_avg_sq")
Slices = list[tuple[torch.nn.Parameter, int, torch.Tensor]]


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
        pass  # skipped layers keep grad None: AdamW skips them and the DP all-reduce never sends them

    def step(self, optimizer: torch.optim.Optimizer, model, plan: Optional[ModelPlan]) -> None:
        step_frozen(optimizer, model.trained_slices(plan))


def unsampled_policy(cfg: Config):
    """The run's policy: FreezeUpdate or AdamWUpdate, from --est-unsampled-update ("auto" resolved)."""
    return FreezeUpdate() if unsampled_update(cfg) == "freeze" else AdamWUpdate()


def _complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().squeeze(1)


@torch.no_grad()
def step_frozen(optimizer: torch.optim.Optimizer, slices: Slices) -> None:
    """optimizer.step() that leaves the unsampled rows/columns of sliced weights and their moments untouched."""
    saved = []
    for p, dim, kept in slices:
        drop = _complement(kept, p.shape[dim])
        state = optimizer.state.get(p, {})
        moments = {k: state[k].index_select(dim, drop) for k in _MOMENTS if k in state}
        saved.append((p, dim, drop, p.index_select(dim, drop), moments))
    optimizer.step()
    for p, dim, drop, values, moments in saved:
        p.index_copy_(dim, drop, values)
        state = optimizer.state[p]
        for k in _MOMENTS:
            if k in moments:
                state[k].index_copy_(dim, drop, moments[k])
            elif k in state:  # first step of this tensor: its unsampled rows keep the initial zero moments
                state[k].index_fill_(dim, drop, 0.0)
