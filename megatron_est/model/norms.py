"""LayerNorm / RMSNorm: apex's fused kernels on CUDA tensors when apex's CUDA extension loads, torch otherwise."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_est.kernels import apex_norms

_USE_APEX = True


def set_use_apex(flag: bool) -> None:
    """--no-use-apex: torch-native norms even where apex is importable."""
    global _USE_APEX
    _USE_APEX = bool(flag)


def apex_active(x: torch.Tensor) -> bool:
    return _USE_APEX and x.is_cuda and apex_norms() is not None


class Norm(nn.Module):
    def __init__(self, kind: str, hidden: int, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if apex_active(x):
            fused_layer_norm_affine, fused_rms_norm_affine = apex_norms()
            shape = (x.shape[-1],)
            if self.kind == "layernorm":
                return fused_layer_norm_affine(x, self.weight, self.bias, shape, self.eps)
            return fused_rms_norm_affine(x.float(), self.weight.float(), shape, self.eps).to(x.dtype)
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        # Llama computes RMSNorm in fp32 and casts back.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
