"""The GPU check's multi-GPU rows: PP 2, TP 2 x PP 2 and DP 2 against one GPU, large activations, many micro-batches.

Large activations (>= 64 MB per exchanged tensor) and >= 4 micro-batches per step are where NCCL point-to-point
exchanges deadlock or corrupt when send/recv pairs are mismatched; small CPU tests cannot show that. DP 2 runs the
default overlapped reduction: NCCL all-reduces of gradient-buffer slices launched from backward hooks
(parallel/grad_overlap.py), where gloo on CPU shows the order and values but not the streams. All runs
fix the sampling strata to 2 (a multiple of every TP and PP size here) so that every layout draws the same
subnetworks (docs/pipeline.md), and compare the loss curves.
"""
from __future__ import annotations

from bench.gpu_check_lib import Ctx, check_curve, fmt, max_diff, train
from bench.gpu_check_train import fp32_flags, fp32_tol

LAYOUTS = {"pp2": (1, 2, 1), "tp2_pp2": (2, 2, 1), "dp2": (1, 1, 2)}  # name -> (TP, PP, DP)


def _flags(ctx: Ctx) -> list[str]:
    same = ["--est-tp-strata", "2", "--est-pp-strata", "2", *fp32_flags(ctx)]
    if ctx.smoke:  # CPU (gloo): same code path, tiny sizes
        return same + ["--micro-batch-size", "1", "--global-batch-size", "4"]
    # fp32 activations [mbs, seq, hidden] = 8 x 1024 x 2048 x 4 B = 64 MiB per exchanged tensor; 4 micro-batches
    return same + ["--num-layers", "4", "--hidden-size", "2048", "--num-attention-heads", "16",
                   "--seq-length", "1024", "--micro-batch-size", "8", "--global-batch-size", "32"]


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def layout_vs_pp1(ctx: Ctx, name: str):
    tp, pp, dp = LAYOUTS[name]
    n = tp * pp * dp
    if ctx.gpu and gpu_count() < n:
        return "skip", f"needs {n} GPUs, {gpu_count()} present"
    if ctx.smoke and tp > 1:
        return "skip", "CPU smoke runs the 2-process layouts only (4 CPU processes are too slow on small machines)"
    ref = check_curve(train(ctx, "gpt2", "gpt2_big_pp1", _flags(ctx)), "PP 1")
    par = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    ls = check_curve(train(ctx, "gpt2", f"gpt2_big_{name}", _flags(ctx) + par, nproc=n), name)
    d, tol = max_diff(ls, ref), 5 * fp32_tol(ctx)
    return ("pass" if d <= tol else "fail"), (f"{_sizes(ctx, dp)}; curve max diff to PP 1 {d:.1e} (tol {tol:.0e}); "
                                              f"losses {fmt(ls)}")


def _sizes(ctx: Ctx, dp: int) -> str:
    """Bytes of one exchanged fp32 activation and micro-batches per step and rank, from the flags actually used."""
    flags = _flags(ctx)

    def val(name: str, default: int) -> int:  # these flags override the tiny-run sizes (argparse: last wins)
        return int(flags[flags.index(name) + 1]) if name in flags else default

    mbs, gbs = val("--micro-batch-size", 0), val("--global-batch-size", 0)
    seq, hidden = val("--seq-length", 64), val("--hidden-size", 256)  # smoke: gpt2-tiny at sequence 64
    return f"{mbs * seq * hidden * 4 / 2**20:.2f} MiB per exchange, {gbs // (mbs * dp)} micro-batches"
