"""Throughput for the log line: tokens/s, achieved TFLOP/s per device (of the subnetwork actually run, and of the
full model it stands in for) and model FLOPs utilisation against the device's peak.

EST makes two numbers matter: the hardware efficiency of what ran (the subnetwork's FLOPs / time: MFU) and the
rate at which the run makes full-model progress (the full model's FLOPs for the same tokens / time), which is
what a baseline run of the full model is compared on.
"""
from __future__ import annotations

from typing import Optional

import torch

# Dense bf16/fp16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity), matched against
# torch.cuda.get_device_name in this order (the PCIe H100 is slower than the SXM one). MFU uses this peak
# whatever the run's precision, as Megatron and PaLM's MFU do; --peak-tflops overrides it.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0),
               ("A800", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("V100", 125.0))


def device_peak_tflops(device: torch.device) -> Optional[float]:
    """The peak of this CUDA device when it is in the table; None on CPU or an unknown GPU (no MFU then)."""
    return peak_for_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_for_name(name: str) -> Optional[float]:
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def throughput(tokens: int, flops: int, full_flops: int, seconds: float, devices: int,
               peak_tflops: Optional[float]) -> dict:
    """Rates over an interval of training steps (all ranks together: `devices` is the world size)."""
    if seconds <= 0:
        return {}
    per_device = flops / seconds / devices / 1e12
    out = {"tokens_per_s": tokens / seconds, "tflops_per_device": per_device,
           "full_model_tflops_per_device": full_flops / seconds / devices / 1e12}
    if peak_tflops:
        out["mfu"] = per_device / peak_tflops
    return out
