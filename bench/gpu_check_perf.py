"""The GPU check's benchmark: step time against FLOPs of EST stages 1 and 2, model FLOPs utilisation, peak memory.

The same measurement as bench/bench_est_step.py (its stages, our FLOPs rule from megatron_est.est.flops), on
the GPU in bf16 autocast, each timed call ending in a device synchronize. MFU = model FLOPs of the step (our
counting rule: 3 x forward, attention scores over the full sequence) / (median step time x peak FLOP/s).
"""
from __future__ import annotations

import os

from bench.bench_est_step import STAGES
from bench.common import interleaved_times, median
from bench.gpu_check_lib import Ctx

H200_BF16_DENSE_PEAK = 989e12  # FLOP/s; override with GPU_CHECK_PEAK_TFLOPS
PERF_SHAPES = {  # preset -> (sequence length, micro-batch) at GPU size
    "gpt2-124m": (1024, 8),
    "tinyllama-1.1b": (2048, 4),
}
SMOKE_PRESET = {"gpt2-124m": "gpt2-tiny", "tinyllama-1.1b": "llama-tiny"}  # same code path, CPU-sized


def peak_flops() -> float:
    return float(os.environ.get("GPU_CHECK_PEAK_TFLOPS", H200_BF16_DENSE_PEAK / 1e12)) * 1e12


def _setup(ctx: Ctx, preset: str):
    import torch

    from megatron_est.config import TrainConfig, model_preset
    from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges
    from megatron_est.est.schedule import Schedule, Stage
    from megatron_est.model.language_model import LanguageModel
    from megatron_est.training.optimizer import build_optimizer

    seq, mbs = (64, 2) if ctx.smoke else PERF_SHAPES[preset]
    cfg = model_preset(SMOKE_PRESET[preset] if ctx.smoke else preset, seq_length=seq)
    dev = torch.device("cpu" if ctx.smoke else "cuda")
    model = LanguageModel(cfg, seed=0).to(dev)
    opt = build_optimizer(model, TrainConfig())
    strata = Strata(1, 1, even_ranges(cfg.num_layers, 1))
    samplers = {n: SubnetworkSampler(cfg, Schedule((Stage(0, *r),)), 0, strata) for n, r in STAGES.items()}
    tokens = torch.randint(0, cfg.vocab_size, (mbs, seq + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    return cfg, dev, model, opt, samplers, tokens


def est_step_perf(ctx: Ctx, preset: str):
    import torch

    from megatron_est.est.flops import step_flops
    from megatron_est.parallel.grads import grad_norm_and_clip, zero_fill_missing_grads

    cfg, dev, model, opt, samplers, tokens = _setup(ctx, preset)
    params = list(model.parameters())
    it = {"n": 0}

    def step(name: str) -> None:
        it["n"] += 1
        plan = model.make_plan(samplers[name](it["n"]), dev)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:], plan).mean()
        loss.backward()
        zero_fill_missing_grads(params)
        grad_norm_and_clip(params, 1.0, None, 1)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()  # the timer must see the GPU's work, not only its launch

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = interleaved_times({n: (lambda n=n: step(n)) for n in STAGES}, reps=2 if ctx.smoke else 5,
                              warmup=1 if ctx.smoke else 2)
    n_tok = tokens.shape[0] * cfg.seq_length
    full = step_flops(cfg, n_tok)
    t_full = median(times["full"])
    n_params = sum(p.numel() for p in params) / 1e6
    parts = [f"{SMOKE_PRESET[preset] if ctx.smoke else preset} ({n_params:.0f}M), seq {cfg.seq_length} x mbs "
             f"{tokens.shape[0]}, full step {t_full * 1e3:.1f} ms"]
    if not ctx.smoke:
        parts.append(f"MFU {full / (t_full * peak_flops()):.1%} of {peak_flops() / 1e12:.0f} TFLOP/s bf16")
        parts.append(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    for name in list(STAGES)[1:]:
        fr = step_flops(cfg, n_tok, samplers[name](0)) / full
        tr = median(times[name]) / t_full
        parts.append(f"{name.split()[0]}: time/FLOPs ratio {tr:.3f}/{fr:.3f} (diff {tr - fr:+.3f})")
    return "info", "; ".join(parts)
