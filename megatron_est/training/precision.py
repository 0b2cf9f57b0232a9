"""Mixed precision for the plain torch engine: bf16 or fp16 compute, fp32 master weights, fp16 loss scaling.

The model's parameters stay fp32 (they are the master weights, and the optimizer state is fp32 too); matmuls
and attention run in bf16/fp16 under torch.autocast, while norms, softmax statistics and the loss stay fp32.
Gradients reach the parameters in fp32, so accumulation over micro-batches and the data-parallel all-reduce are
fp32. This is the memory trade of torch AMP rather than Megatron's (half-precision weights plus a separate fp32
copy): it saves activation memory, not weight memory. Evaluation runs under the same autocast
(training/evaluate.py). Under --deepspeed, DeepSpeed's own bf16/fp16 modes are used instead (half-precision
module, fp32 partitions in the optimizer).

fp16 gradients can overflow: the loss is multiplied by a dynamic scale before backward; after the gradients
are reduced, every rank checks them for inf/NaN and all ranks agree (one all-reduce). An overflowing step is
skipped (no optimizer step), counted, and logged; the scale halves after `hysteresis` overflows and doubles
after `loss_scale_window` clean steps (Megatron's rules).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_est.config import EngineConfig


class DynamicLossScaler:
    def __init__(self, initial: float, min_scale: float = 1.0, window: int = 1000, hysteresis: int = 2,
                 static: Optional[float] = None):
        self.dynamic = static is None
        self.scale = float(static if static is not None else initial)
        self.min_scale, self.window, self.hysteresis = float(min_scale), int(window), int(hysteresis)
        self.hysteresis_left = self.hysteresis
        self.good_steps = 0
        self.skipped_iterations = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.skipped_iterations += 1
            self.good_steps = 0
            if not self.dynamic:
                return
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
                self.hysteresis_left = self.hysteresis
            return
        self.good_steps += 1
        if self.dynamic and self.good_steps % self.window == 0:
            self.scale *= 2.0
            self.hysteresis_left = self.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "hysteresis_left": self.hysteresis_left,
                "skipped_iterations": self.skipped_iterations, "dynamic": self.dynamic}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        self.good_steps = int(sd["good_steps"])
        self.hysteresis_left = int(sd["hysteresis_left"])
        self.skipped_iterations = int(sd["skipped_iterations"])


class Precision:
    """What the training step needs to know about the compute precision."""

    def __init__(self, ecfg: EngineConfig, device: torch.device):
        self.name = ecfg.precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)
        self.device_type = device.type
        self.scaler = None
        if self.name == "fp16":
            self.scaler = DynamicLossScaler(ecfg.initial_loss_scale, ecfg.min_loss_scale, ecfg.loss_scale_window,
                                            ecfg.hysteresis, ecfg.loss_scale)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.scaler is None else loss * self.scaler.scale

    def unscale_and_check(self, params: list) -> bool:
        """Unscale reduced gradients; False (skip this step) when any rank found inf/NaN. A collective."""
        if self.scaler is None:
            return True
        used = self.scaler.scale  # the scale this step's backward ran with (update() may change it)
        grads = [p.grad for p in params if p.grad is not None]
        local = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
        if grads:
            local = torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum()
        bad = torch.tensor([0.0 if math.isfinite(float(local)) else 1.0], device=local.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        overflow = bool(bad.item())
        self.scaler.update(overflow)
        if overflow:
            for p in params:
                p.grad = None
            return False
        if grads and used != 1.0:
            torch._foreach_mul_(grads, 1.0 / used)
        return True

    def metrics(self) -> dict:
        if self.scaler is None:
            return {}
        return {"loss_scale": self.scaler.scale, "skipped_iterations": self.scaler.skipped_iterations}

    # checkpointing: the scaler's state travels with the optimizer's
    def state_dict(self) -> Optional[dict]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, sd: Optional[dict]) -> None:
        if self.scaler is not None and sd:
            self.scaler.load_state_dict(sd)


def build_precision(ecfg: EngineConfig, device: torch.device) -> Optional[Precision]:
    """None for fp32 (nothing to do), else the Precision of the run."""
    return None if ecfg.precision == "fp32" else Precision(ecfg, device)


def configure_model(cfg, model: torch.nn.Module) -> None:
    """Model-side engine options: activation recompute of the sampled subnetwork, apex's fused norms."""
    from megatron_est.model.norms import set_use_apex
    from megatron_est.model.recompute import configure_recompute

    e = cfg.engine
    configure_recompute(model, e.recompute_granularity, e.recompute_num_layers)
    set_use_apex(e.use_apex)
