"""AdamW with Megatron's parameter groups and the warmup + decay learning-rate schedule; optimizer state in one
checkpoint layout whichever AdamW implementation (torch's or apex's FusedAdam) ran."""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_est.config import Config, ConfigError, TrainConfig
from megatron_est.est.rewarm import rewarm_factor
from megatron_est.est.sampler import Subnetwork
from megatron_est.kernels import apex_fused_adam
from megatron_est.parallel.storage import row_major_parameters
from megatron_est.training.adamw import AdamW


def build_optimizer(model: torch.nn.Module, tr: TrainConfig, use_apex: bool = True) -> torch.optim.Optimizer:
    """Biases and norm weights (1-D parameters) get no weight decay, as in Megatron.

    On GPU: apex's FusedAdam (AdamW mode) when its CUDA extension loads and use_apex, else torch's fused AdamW;
    on CPU torch's fused AdamW too (one pass over each tensor: about 4x faster than the multi-tensor path at
    GPT-2 124M on one thread), stepping the column-major row-parallel weights in place (training/adamw.py).
    Both modes of --est-unsampled-update count a step on every tensor every step (freeze steps sliced weights on
    their kept slices, est/unsampled.py), so FusedAdam's one step count per group equals torch's per-tensor
    counts.
    """
    groups = param_groups(model, tr)
    cuda = next(model.parameters()).is_cuda
    fused_adam = apex_fused_adam() if cuda and use_apex else None
    if fused_adam is not None:
        row_major_parameters(model)  # apex's multi-tensor kernels refuse non-contiguous tensors
        return fused_adam(groups, lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps,
                          adam_w_mode=True)
    return AdamW(groups, lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps, fused=True)


def param_groups(model: torch.nn.Module, tr: TrainConfig) -> list[dict]:
    """Megatron's two groups: weight decay on matrices, none on biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 else decay).append(p)
    return [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def step_lr(cfg: Config, iteration: int, sub: Optional[Subnetwork]) -> float:
    """The learning rate of the step that trains `iteration` with subnetwork `sub` (None: the full model, no EST
    schedule, as the engines accept it): the warmup + decay schedule times the EST re-warm after stage switches
    (est/rewarm.py). Every engine sets this one value, and the log records it."""
    if sub is None:
        return learning_rate(cfg.train, iteration)
    factor = rewarm_factor(cfg.est.lr_rewarm_iters, sub.stage, sub.rates.start, iteration)
    return learning_rate(cfg.train, iteration) * factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


# ------------------------------------------------------------------------------ checkpointed optimizer state
# torch's AdamW keeps a float32 tensor state[p]["step"] per parameter. apex's FusedAdam (apex/optimizers/
# fused_adam.py) keeps only exp_avg / exp_avg_sq (fp32) per parameter and one step count per param group,
# group["step"] (a Python int; an int tensor when capturable), advanced on every step() call; its groups also
# carry "bias_correction". Checkpoints hold torch's layout, converted on save and on load, so a run resumes with
# or without apex. Under --deepspeed, DeepSpeed owns the optimizer state and none of this applies.
_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")  # taken from the checkpoint, as torch's loading does


def uses_param_steps(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's Adam/AdamW (per-parameter step), False for FusedAdam's per-group step."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def group_steps_to_param_steps(sd: dict) -> dict:
    """A state dict in FusedAdam's layout -> torch AdamW's (a state dict already in torch's is returned as is)."""
    state = {i: dict(s) for i, s in sd["state"].items()}
    for g in sd["param_groups"]:
        if g.get("step") is not None:  # float(): an int, or capturable FusedAdam's one-element tensor
            for i in g["params"]:
                if i in state:
                    state[i]["step"] = torch.tensor(float(g["step"]), dtype=torch.float32)
    groups = [{k: v for k, v in g.items() if k not in ("step", "bias_correction")} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def param_steps_to_group_steps(sd: dict) -> dict:
    """torch AdamW's layout -> FusedAdam's. The group's step is its largest per-parameter step: the number of
    optimizer steps (a tensor that skipped steps, possible only under the freeze mode, loses its own count)."""
    state = {i: {k: v for k, v in s.items() if k != "step"} for i, s in sd["state"].items()}
    groups = []
    for g in sd["param_groups"]:
        steps = [int(sd["state"][i]["step"]) for i in g["params"] if "step" in sd["state"].get(i, {})]
        g = {**g, "bias_correction": True}
        if steps:
            g["step"] = max(steps)
        groups.append(g)
    return {"state": state, "param_groups": groups}


def optimizer_state_for_checkpoint(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() in torch AdamW's layout, whichever implementation ran."""
    sd = optimizer.state_dict()
    return sd if uses_param_steps(optimizer) else group_steps_to_param_steps(sd)


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a checkpoint's optimizer state written by either implementation (older checkpoints hold FusedAdam's
    layout as it was) into this run's optimizer, which keeps its own implementation switches (fused, foreach,
    capturable: a GPU checkpoint resumes on CPU); the state and the hyperparameters come from the checkpoint."""
    sd = group_steps_to_param_steps(sd)
    if not uses_param_steps(optimizer):
        sd = param_steps_to_group_steps(sd)
    if len(sd["param_groups"]) != len(optimizer.param_groups):
        raise ConfigError(f"--load: the checkpoint's optimizer state has {len(sd['param_groups'])} parameter "
                          f"groups, this run's optimizer {len(optimizer.param_groups)}")
    groups = []
    for live, saved in zip(optimizer.param_groups, sd["param_groups"]):
        g = {k: v for k, v in live.items() if k not in ("params", "step")}
        g.update({k: saved[k] for k in (*_HYPERPARAMETERS, "step", "params") if k in saved})
        groups.append(g)
    optimizer.load_state_dict({"state": sd["state"], "param_groups": groups})
