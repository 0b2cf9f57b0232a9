"""Which fast kernels a run uses: NVIDIA apex's fused norms and FusedAdam, and TF32 for fp32 matmuls.

apex's Python packages import fine from a build without its CUDA extensions (a plain `pip install` without
--cuda_ext): apex/normalization/fused_layer_norm.py imports the `fused_layer_norm_cuda` extension lazily, at the
first forward, and apex/optimizers/fused_adam.py needs the `amp_C` extension only in FusedAdam's constructor
(through apex/multi_tensor_apply). Such a build would fail mid-run, so apex counts as present only when the
extension modules themselves import.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

NORM_EXTENSION = "fused_layer_norm_cuda"  # apex's setup.py: CUDAExtension(name="fused_layer_norm_cuda")
ADAM_EXTENSION = "amp_C"  # apex's setup.py: CUDAExtension(name="amp_C"), multi_tensor_adam among others


def _import(module: str):
    """The module, or None when it is missing or broken (an extension built for another torch/CUDA raises
    ImportError or OSError at import)."""
    try:
        return importlib.import_module(module)
    except Exception:  # noqa: BLE001
        return None


@functools.lru_cache(maxsize=None)
def apex_norms() -> Optional[tuple]:
    """(fused_layer_norm_affine, fused_rms_norm_affine) when apex and its CUDA extension load, else None."""
    mod = _import(NORM_EXTENSION) and _import("apex.normalization.fused_layer_norm")
    fns = tuple(getattr(mod, n, None) for n in ("fused_layer_norm_affine", "fused_rms_norm_affine"))
    return fns if mod is not None and all(fns) else None


@functools.lru_cache(maxsize=None)
def apex_fused_adam():
    """apex.optimizers.FusedAdam when apex and its CUDA extension load, else None."""
    mod = _import(ADAM_EXTENSION) and _import("apex.optimizers")
    return getattr(mod, "FusedAdam", None) if mod is not None else None


def tf32_wanted(flag: bool, capability: Optional[tuple[int, int]]) -> bool:
    """TF32 for fp32 matmuls and convolutions: on Ampere (compute capability 8.x) and newer unless --no-tf32.
    capability is None for a CPU run. Older GPUs have no TF32 units."""
    return bool(flag) and capability is not None and capability[0] >= 8


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def configure_tf32(flag: bool, device: torch.device) -> bool:
    """Set TF32 for this process (both ways: cuDNN's default is on) and return whether it is on."""
    on = tf32_wanted(flag, device_capability(device))
    # The legacy switches rather than torch's fp32_precision: once both APIs are used, reading allow_tf32 raises,
    # and DeepSpeed and user code read the legacy ones. torch.get_float32_matmul_precision() follows them.
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on


def configure_kernels(ecfg, device: torch.device, optimizer) -> str:
    """Set TF32 for the run; one header line saying which kernels it uses (optimizer None: DeepSpeed's)."""
    tf32 = configure_tf32(ecfg.tf32, device)
    cap = device_capability(device)
    why = "--no-tf32" if not ecfg.tf32 else "no GPU" if cap is None else f"compute capability {cap[0]}.{cap[1]}"
    norms = "apex fused" if ecfg.use_apex and device.type == "cuda" and apex_norms() is not None else "torch"
    opt = "DeepSpeed's" if optimizer is None else f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    return f"> kernels: TF32 matmuls {'on' if tf32 else 'off'} ({why}) | norms: {norms} | optimizer: {opt}"
