"""The GPU check's training checks: tiny GPT-2 / Llama runs through the real entry points, compared.

Each function takes a Ctx and returns (status, detail); CheckError means "fail" with its message. Baselines
(the fp32 run of a family, its CPU reference) are cached in the work folder and shared between checks.
"""
from __future__ import annotations

import os
import sys

from bench.gpu_check_lib import (ROOT, CheckError, Ctx, check_curve, fmt, kernels_line, losses, max_diff,
                                 run_cmd, supports_flag, train)

# Tolerances. fp32 with TF32 off differs between CPU and GPU kernels only by summation order (~1e-6 relative);
# with TF32 on, matmuls keep 10 mantissa bits. bf16 keeps 8 bits: a few hundredths of a nat after 9 steps.
FP32_TOL, TF32_TOL, HALF_FIRST_TOL, HALF_CURVE_TOL = 2e-4, 2e-2, 0.05, 0.15


def fp32_flags(ctx: Ctx) -> list[str]:
    """TF32 off on the GPU side, when the entry point has the flag, so fp32 means fp32 there."""
    return ["--no-tf32"] if ctx.gpu and supports_flag(ctx, "--no-tf32") else []


def fp32_tol(ctx: Ctx) -> float:
    return TF32_TOL if ctx.gpu and not fp32_flags(ctx) else FP32_TOL


def baseline(ctx: Ctx, family: str) -> list[float]:
    """The family's fp32 losses on the device under test (cached)."""
    return check_curve(train(ctx, family, f"{family}_fp32", fp32_flags(ctx)), f"{family} fp32")


def fp32_vs_cpu(ctx: Ctx, family: str):
    cpu = check_curve(train(ctx, family, f"{family}_cpu", [], cpu=True), f"{family} CPU")
    dev = baseline(ctx, family)
    d0, tol = abs(cpu[0] - dev[0]), fp32_tol(ctx)
    detail = (f"first loss {dev[0]:.6f} vs CPU {cpu[0]:.6f} (diff {d0:.1e}, tol {tol:.0e}"
              f"{'' if fp32_flags(ctx) or ctx.smoke else ', no --no-tf32 flag'}); "
              f"curve max diff {max_diff(cpu, dev):.1e}; losses {fmt(dev)}; {kernels_line(ctx, f'{family}_fp32')}")
    return ("pass" if d0 <= tol else "fail"), detail


def half(ctx: Ctx, family: str, flag: str, name: str, extra: tuple = ()):
    """bf16 / fp16 (plain engine or DeepSpeed): finite, falling, close to the fp32 run."""
    ref = baseline(ctx, family)
    recs = train(ctx, family, name, [flag, *extra])
    ls = check_curve(recs, name)
    d0, dc = abs(ls[0] - ref[0]), max_diff(ls, ref)
    ok = d0 <= HALF_FIRST_TOL and dc <= HALF_CURVE_TOL
    last = [r for r in recs if "lm_loss" in r][-1]  # (the final record is the evaluation's)
    skipped = last.get("skipped_iterations")  # fp16: steps skipped for gradient overflow
    return ("pass" if ok else "fail"), (f"first loss diff to fp32 {d0:.1e} (tol {HALF_FIRST_TOL}), curve max diff "
                                        f"{dc:.1e} (tol {HALF_CURVE_TOL}); losses {fmt(ls)}"
                                        + ("" if skipped is None else f"; overflow-skipped steps {skipped}"))


def zero(ctx: Ctx, stage: int, precision: str = "fp32"):
    """DeepSpeed ZeRO-N: finite, falling, the same curve as the plain engine (same weights, batches, subnetworks;
    unsampled parameters frozen in both engines). Half precision differs more: DeepSpeed's bf16/fp16 modes keep
    a half-precision module, the plain engine autocasts fp32 weights."""
    flags = ["--deepspeed", "--zero-stage", str(stage)] + ([f"--{precision}"] if precision != "fp32" else [])
    if precision == "fp32":
        flags += fp32_flags(ctx)
    ref = baseline(ctx, "gpt2") if precision == "fp32" else losses(train(ctx, "gpt2", f"gpt2_{precision}",
                                                                          [f"--{precision}"]))
    ls = check_curve(train(ctx, "gpt2", f"gpt2_zero{stage}_{precision}", flags), f"zero{stage} {precision}")
    tol0, tol = (fp32_tol(ctx), 5 * fp32_tol(ctx)) if precision == "fp32" else (HALF_FIRST_TOL, HALF_CURVE_TOL)
    d0, dc = abs(ls[0] - ref[0]), max_diff(ls, ref)
    return ("pass" if d0 <= tol0 and dc <= tol else "fail"), (
        f"to the plain engine: first loss diff {d0:.1e} (tol {tol0:.0e}), curve max diff {dc:.1e} (tol {tol:.0e}); "
        f"losses {fmt(ls)}")


def same_as_baseline(ctx: Ctx, family: str, name: str, flags: list[str]):
    """A run that must reproduce the fp32 curve (recompute, apex off): same math, other kernels/schedule."""
    ref = baseline(ctx, family)
    ls = check_curve(train(ctx, family, name, flags + fp32_flags(ctx)), name)
    d, tol = max_diff(ls, ref), 5 * fp32_tol(ctx)
    return ("pass" if d <= tol else "fail"), f"curve max diff to fp32 run {d:.1e} (tol {tol:.0e})"


def apex_importable() -> bool:
    """apex with its CUDA extension, as training decides it (megatron_est.kernels)."""
    from megatron_est.kernels import apex_norms

    return apex_norms() is not None


def apex_on_off(ctx: Ctx):
    """The fp32 baseline ran with apex's fused norms where importable (the default); this run without."""
    status, detail = same_as_baseline(ctx, "gpt2", "gpt2_noapex", ["--no-use-apex"])
    return status, (f"{detail}; default run: {kernels_line(ctx, 'gpt2_fp32')}; --no-use-apex: "
                    f"{kernels_line(ctx, 'gpt2_noapex')}")


def save_resume(ctx: Ctx, family: str = "gpt2"):
    """Stop at half-way (--exit-interval saves), resume with --load: the rest of the curve is the baseline's."""
    ref = baseline(ctx, family)
    ckpt, k = os.path.join(ctx.work, f"{family}_ckpt"), ctx.iters() // 2
    save = ["--save", ckpt, "--save-interval", str(k), *fp32_flags(ctx)]
    first = losses(train(ctx, family, f"{family}_resume_a", save + ["--exit-interval", str(k)], cached=False))
    rest = losses(train(ctx, family, f"{family}_resume_b", save + ["--load", ckpt], cached=False))
    d = max_diff(first + rest, ref)
    ok = len(first) == k and d <= fp32_tol(ctx)
    return ("pass" if ok else "fail"), (f"{len(first)} + {len(rest)} iterations, max diff to the uninterrupted "
                                        f"run {d:.1e} (tol {fp32_tol(ctx):.0e})")


def hf_export(ctx: Ctx, family: str = "gpt2"):
    """export-hf of the resumed run's final checkpoint; transformers' loss on the device equals ours."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_est.convert.checkpoint import merge_checkpoint
    from megatron_est.model.language_model import LanguageModel

    ckpt, out = os.path.join(ctx.work, f"{family}_ckpt"), os.path.join(ctx.work, f"{family}_hf")
    if not os.path.isdir(ckpt):
        save_resume(ctx, family)
    run_cmd(ctx, [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "export-hf", "--load", ckpt,
                  "--output", out], log_name="export_hf")
    dev = torch.device("cuda" if ctx.gpu else "cpu")
    cfg, sd, _ = merge_checkpoint(ckpt)
    ours = LanguageModel(cfg, seed=0)
    ours.load_state_dict(sd)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(dev).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        a = ours.to(dev).eval()(tokens[:, :-1], tokens[:, 1:]).mean().item()
        logits = hf(input_ids=tokens[:, :-1]).logits.float()
        b = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    tol = 1e-3 if ctx.gpu else 1e-4
    return ("pass" if abs(a - b) <= tol else "fail"), (f"{type(hf).__name__} loss {b:.6f} vs ours {a:.6f} on "
                                                       f"{dev.type} (diff {abs(a - b):.1e}, tol {tol:.0e})")
