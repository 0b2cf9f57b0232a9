"""The GPU check's environment checks: versions, flash attention on the model's own q/k/v, host syncs per step."""
from __future__ import annotations

import collections
import os
import warnings

from bench.gpu_check_lib import PRESET, CheckError, Ctx, corpus


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "installed")
    except Exception as e:  # noqa: BLE001 (ImportError, or a broken build failing at import)
        return f"missing ({type(e).__name__})"


def environment(ctx: Ctx):
    import torch

    from bench.gpu_check_train import apex_importable

    parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}", f"deepspeed {_version('deepspeed')}",
             f"transformers {_version('transformers')}", f"apex {'with CUDA extension' if apex_importable() else 'absent (torch kernels)'}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        parts += [f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}", f"cuDNN {torch.backends.cudnn.version()}",
                  f"{torch.cuda.device_count()} x {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"]
    elif ctx.gpu:
        return "fail", "torch sees no CUDA device: " + ", ".join(parts)
    return "info", ", ".join(parts)


def flash_sdpa(ctx: Ctx):
    """The model's attention (GQA, EST-sliced heads too) with only the flash backend allowed, bf16, fwd+bwd.

    SDPA raises when no allowed kernel takes the call (layout, dtype, enable_gqa, mask), so passing means the
    model really gets flash attention; its loss is compared with the math backend's. The CPU smoke run takes
    the same path with torch's CPU flash kernel on a small model (it tests this check, not CUDA's kernel)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_est.config import model_preset
    from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges
    from megatron_est.est.schedule import Schedule, Stage
    from megatron_est.model.language_model import LanguageModel

    dev = torch.device("cpu" if ctx.smoke else "cuda")
    # TinyLlama's attention: 32 heads, 4 KV groups, head dim 64 (smoke: llama-tiny's 8 heads, 2 groups)
    cfg = (model_preset("llama-tiny", num_layers=2, seq_length=64) if ctx.smoke else
           model_preset("tinyllama-1.1b", num_layers=2, seq_length=1024))
    model = LanguageModel(cfg, seed=0).to(dev)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), device=dev)
    sampler = SubnetworkSampler(cfg, Schedule((Stage(0, 0.5, 0.5, 1.0),)), 0, Strata(1, 1, even_ranges(2, 1)))
    out = []
    for label, plan in (("full", None), ("EST heads 0.5", model.make_plan(sampler(0), dev))):
        losses = {}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            with sdpa_kernel([backend]), torch.autocast(dev.type, dtype=torch.bfloat16):
                try:
                    loss = model(tokens[:, :-1], tokens[:, 1:], plan).mean()
                    loss.backward()
                except RuntimeError as e:
                    raise CheckError(f"{label}: {backend.name} refused the model's call: {str(e)[:200]}") from e
            losses[backend.name] = loss.item()
        d = abs(losses["FLASH_ATTENTION"] - losses["MATH"])
        if d > 0.02:
            raise CheckError(f"{label}: flash loss {losses['FLASH_ATTENTION']:.4f} vs math {losses['MATH']:.4f}")
        out.append(f"{label}: flash ran, loss diff to math {d:.1e}")
    if ctx.smoke:
        return "skip", "needs CUDA; the CPU flash kernel took the same calls: " + "; ".join(out)
    return "pass", "; ".join(out)


def _count_syncs(argv: list[str], debug: bool) -> collections.Counter:
    """Host-device syncs of one in-process training run, by source line (sync debug mode 'warn')."""
    import torch

    from megatron_est.training.pretrain import main

    sites: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if debug:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            main(argv)
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
    return sites


def host_syncs(ctx: Ctx):
    """Syncs per training step: the difference of a 2n- and an n-iteration run, over n (set-up cancels).

    The CPU smoke run makes the same two in-process runs without the debug mode (it has no CUDA)."""
    n = 4
    base = ["--model-preset", PRESET["gpt2"], *ctx.size_flags(), "--log-interval", "1", "--eval-interval", "1000",
            "--eval-iters", "1", "--est-schedule", "0:0.5,0.5,0.5", *corpus(ctx)]
    a = _count_syncs(base + ["--train-iters", str(n)], ctx.gpu)
    b = _count_syncs(base + ["--train-iters", str(2 * n)], ctx.gpu)
    if ctx.smoke:
        return "skip", f"needs CUDA (torch.cuda.set_sync_debug_mode); in-process runs of {n} and {2 * n} steps ran"
    per_step = {k: (b[k] - a[k]) / n for k in b if b[k] > a[k]}
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[:6]
    return "info", (f"{sum(per_step.values()):.1f} syncs per step (stage 1, log every step); "
                    + "; ".join(f"{k} x{v:g}" for k, v in top))
