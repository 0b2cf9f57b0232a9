"""What the optimizer does to parameters outside the step's subnetwork (--est-unsampled-update).

"adamw": they get a zero gradient, so AdamW still moves them by momentum and weight decay and every parameter's
step count advances every step (what ZeRO does, so the only mode under --deepspeed).
"freeze" (the default on the plain engine, via "auto"; config.unsampled_update): they and their AdamW moments
are left exactly as they were. Skipped layers keep grad None, which torch's AdamW skips outright; for sliced
weights the unsampled rows/columns and their exp_avg / exp_avg_sq are saved before optimizer.step() and written
back after. Caveat: AdamW's step count (bias correction) is per tensor, so it still
advances for a tensor of which only some rows trained.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_est.model.plan import ModelPlan

_MOMENTS = ("exp_avg", "exp_avg_sq")


def kept_slices(model: torch.nn.Module, plan: Optional[ModelPlan]) -> list[tuple[torch.nn.Parameter, int, torch.Tensor]]:
    """(parameter, dim, kept local indices) for every weight this step's plan slices."""
    if plan is None:
        return []
    out = []
    for i, lp in plan.layers.items():
        layer = model.decoder.layers[i - model.decoder.first]
        if lp.attn is not None:
            qkv = layer.attention.qkv
            out += [(qkv.weight, 0, lp.attn.qkv_rows), (layer.attention.proj.weight, 1, lp.attn.proj_cols)]
            if qkv.bias is not None:
                out.append((qkv.bias, 0, lp.attn.qkv_rows))
        if lp.mlp is not None:
            mlp, idx = layer.mlp, lp.mlp.index
            for lin in ((mlp.gate, mlp.up) if mlp.swiglu else (mlp.fc1,)):
                out.append((lin.weight, 0, idx))
                if lin.bias is not None:
                    out.append((lin.bias, 0, idx))
            out.append((mlp.fc2.weight, 1, idx))
    return out


def _complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().squeeze(1)


@torch.no_grad()
def step_frozen(optimizer: torch.optim.Optimizer, slices: list[tuple[torch.nn.Parameter, int, torch.Tensor]]) -> None:
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
