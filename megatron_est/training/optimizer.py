"""AdamW with Megatron's parameter groups and the warmup + decay learning-rate schedule."""
from __future__ import annotations

import math

import torch

from megatron_est.config import TrainConfig


def apex_fused_adam():
    """apex.optimizers.FusedAdam when NVIDIA apex is importable, else None."""
    try:
        from apex.optimizers import FusedAdam
    except Exception:  # noqa: BLE001
        return None
    return FusedAdam


def build_optimizer(model: torch.nn.Module, tr: TrainConfig, use_apex: bool = True) -> torch.optim.Optimizer:
    """Biases and norm weights (1-D parameters) get no weight decay, as in Megatron.

    On GPU: apex's FusedAdam (AdamW mode) when importable and use_apex, else torch's fused AdamW.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused kernels on GPU; the multi-tensor (foreach) path on CPU, where the default is a per-tensor loop.
    cuda = next(model.parameters()).is_cuda
    fused_adam = apex_fused_adam() if cuda and use_apex else None
    if fused_adam is not None:
        return fused_adam(groups, lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps,
                          adam_w_mode=True)
    impl = {"fused": True} if cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps, **impl)


def learning_rate(tr: TrainConfig, iteration: int) -> float:
    """LR for the step that trains `iteration` (0-based): linear warmup, then cosine/linear decay to min_lr."""
    if tr.lr_warmup_iters > 0 and iteration < tr.lr_warmup_iters:
        return tr.lr * (iteration + 1) / tr.lr_warmup_iters
    if tr.lr_decay_style == "constant":
        return tr.lr
    decay_iters = tr.lr_decay_iters or tr.train_iters
    span = max(1, decay_iters - tr.lr_warmup_iters)
    ratio = min(1.0, (iteration - tr.lr_warmup_iters) / span)
    if tr.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return tr.min_lr + coeff * (tr.lr - tr.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
