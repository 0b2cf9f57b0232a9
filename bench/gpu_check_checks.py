"""The GPU check's list: most important first, so a run cut short by its budget still answers the main questions.

Each entry names the function a child process runs (module:function plus arguments, imported only there, so
the driver itself never imports torch) and its time limits on a GPU and in the CPU smoke run.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    what: str  # one line for the table and --list
    target: str  # "module:function"
    args: tuple = ()
    gpu_timeout_s: float = 90.0
    smoke_timeout_s: float = 240.0

    def timeout(self, smoke: bool) -> float:
        return self.smoke_timeout_s if smoke else self.gpu_timeout_s


T, E, P, X = "bench.gpu_check_train", "bench.gpu_check_env", "bench.gpu_check_perf", "bench.gpu_check_parallel"
CHECKS = (
    Check("env", "versions: torch, CUDA, NCCL, cuDNN, DeepSpeed, transformers, apex; the GPUs", f"{E}:environment",
          gpu_timeout_s=60),
    Check("flash_sdpa", "flash SDPA on the model's own q/k/v, bf16, GQA (full and EST-sliced heads)",
          f"{E}:flash_sdpa", gpu_timeout_s=90),
    Check("gpt2_fp32_vs_cpu", "gpt2-tiny fp32, 3 EST stages: finite, falling, first loss = CPU run's",
          f"{T}:fp32_vs_cpu", ("gpt2",), gpu_timeout_s=120),
    Check("gpt2_bf16", "gpt2-tiny --bf16 (plain engine): finite, falling, close to fp32", f"{T}:half",
          ("gpt2", "--bf16", "gpt2_bf16")),
    Check("zero1_fp32", "DeepSpeed ZeRO-1 fp32: finite, falling, same curve as the plain engine", f"{T}:zero", (1,)),
    Check("zero2_fp32", "DeepSpeed ZeRO-2 fp32: as above", f"{T}:zero", (2,)),
    Check("zero3_fp32", "DeepSpeed ZeRO-3 fp32: as above", f"{T}:zero", (3,)),
    Check("zero2_bf16", "DeepSpeed ZeRO-2 --bf16: curve close to plain bf16", f"{T}:zero", (2, "bf16")),
    Check("gpt2_fp16", "gpt2-tiny --fp16 (plain engine, loss scaling): finite, falling, close to fp32", f"{T}:half",
          ("gpt2", "--fp16", "gpt2_fp16")),
    Check("zero2_fp16", "DeepSpeed ZeRO-2 --fp16 (GPU only): curve close to plain fp16", f"{T}:zero",
          (2, "fp16")),
    Check("save_resume", "stop half-way (--exit-interval), --load: rest of the curve = uninterrupted run",
          f"{T}:save_resume"),
    Check("hf_export", "export-hf, then transformers' loss on the GPU = ours", f"{T}:hf_export"),
    Check("llama_fp32_vs_cpu", "llama-tiny (GQA, SwiGLU, RoPE) fp32: as gpt2", f"{T}:fp32_vs_cpu", ("llama",),
          gpu_timeout_s=120),
    Check("llama_bf16", "llama-tiny --bf16: finite, falling, close to fp32", f"{T}:half",
          ("llama", "--bf16", "llama_bf16")),
    Check("recompute", "--recompute-activations: same curve as without", f"{T}:same_as_baseline",
          ("gpt2", "gpt2_recompute", ["--recompute-activations"])),
    Check("apex_off", "--no-use-apex against the default (apex fused norms where importable): same curve",
          f"{T}:apex_on_off"),
    Check("host_syncs", "host-device syncs per training step (torch.cuda.set_sync_debug_mode)",
          f"{E}:host_syncs"),
    Check("perf_gpt2_124m", "GPT-2 124M bf16: EST stage 1/2 step time vs FLOPs ratio, MFU, peak memory",
          f"{P}:est_step_perf", ("gpt2-124m",), gpu_timeout_s=120),
    Check("perf_tinyllama", "TinyLlama-1.1B shape bf16: as above", f"{P}:est_step_perf", ("tinyllama-1.1b",),
          gpu_timeout_s=150),
    Check("pp2", "PP 2 against PP 1: 64 MiB activations, 4 micro-batches (>= 2 GPUs)", f"{X}:layout_vs_pp1",
          ("pp2",), gpu_timeout_s=150),
    Check("tp2_pp2", "TP 2 x PP 2 against PP 1, same sizes (>= 4 GPUs)", f"{X}:layout_vs_pp1", ("tp2_pp2",),
          gpu_timeout_s=150),
    Check("dp2", "DP 2 (overlapped in-place gradient reduction) against PP 1, same sizes (>= 2 GPUs)",
          f"{X}:layout_vs_pp1", ("dp2",), gpu_timeout_s=150),
)
BY_NAME = {c.name: c for c in CHECKS}


def run_child(name: str, work: str, smoke: bool, budget_s: float) -> tuple[str, str]:
    """Run one check in this process; (status, detail). Any exception is a failure with its message."""
    from bench.gpu_check_lib import CheckError, Ctx

    c = BY_NAME[name]
    ctx = Ctx(work, smoke, time.monotonic() + budget_s)
    if smoke and name.endswith("_fp16") and name.startswith("zero"):
        return "skip", "needs CUDA (DeepSpeed fp16)"
    mod, fn = c.target.split(":")
    try:
        return getattr(importlib.import_module(mod), fn)(ctx, *c.args)
    except CheckError as e:
        return "fail", str(e)
    except Exception as e:  # noqa: BLE001 (a bug or a missing package: recorded, the driver moves on)
        return "fail", f"{type(e).__name__}: {str(e)[:300]}"
