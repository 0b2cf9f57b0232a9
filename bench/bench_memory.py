#!/usr/bin/env python
"""Peak memory of real training steps on CPU against the memory model (megatron_est/planning/memory.py).

Each configuration runs in fresh processes (one per rank, gloo) started with glibc's malloc told to serve every
allocation above 64 KiB by its own mmap (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_ARENA_MAX=1): a freed tensor then
leaves the resident set at once, so the resident set's high-water mark tracks live tensor bytes, as
torch.cuda.max_memory_allocated does on a GPU. Measured = VmHWM - VmRSS just before the model is built (imports
and the process group excluded; the high-water mark is reset there through /proc/self/clear_refs), over
--steps optimizer steps of the real training loop (the DeepSpeed engine for ZeRO rows). Estimated = the memory
model for the same rank and step (EST stage from the schedule), device and host memory together (an offloaded
optimizer lives in the same RAM here). Ranks of a configuration are reported as their maximum.

    python bench/bench_memory.py                   # every configuration of docs/tuning.md's table
    python bench/bench_memory.py --only plain est1 --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.multiprocessing as mp  # noqa: E402

from bench.common import free_port  # noqa: E402

MODEL = ["--model-preset", "gpt2-tiny", "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8",
         "--vocab-size", "8192", "--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "8",
         "--train-iters", "3", "--lr-warmup-iters", "1", "--eval-interval", "1000000", "--log-interval", "1",
         "--est-schedule", "none", "--seed", "1"]
DS_JSON = {"zero_optimization": {"reduce_bucket_size": 2_000_000, "allgather_bucket_size": 2_000_000,
                                 "stage3_prefetch_bucket_size": 2_000_000, "stage3_param_persistence_threshold": 0}}
WIDE = ["--num-layers", "6", "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "64",
        "--micro-batch-size", "2", "--global-batch-size", "4"]
# name: (world size, extra flags)
CONFIGS = {
    "plain": (1, []),
    "plain_selective": (1, ["--recompute-granularity", "selective"]),
    "plain_full": (1, ["--recompute-granularity", "full"]),
    "plain_bf16": (1, ["--bf16"]),
    "est_stage1": (1, ["--est-schedule", "0:0.5,0.5,0.5"]),
    "llama": (1, ["--model-preset", "llama-tiny", "--num-layers", "4", "--hidden-size", "256",
                  "--num-attention-heads", "8"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "zero0_dp2": (2, ["--deepspeed", "--zero-stage", "0"]),
    "zero1_dp2": (2, ["--deepspeed", "--zero-stage", "1"]),
    "zero2_dp2": (2, ["--deepspeed", "--zero-stage", "2"]),
    "zero3_dp2": (2, ["--deepspeed", "--zero-stage", "3"]),
    "zero2_offload_dp2": (2, ["--deepspeed", "--zero-stage", "2", "--offload-optimizer"]),
    "zero2_bf16_dp2": (2, ["--deepspeed", "--zero-stage", "2", "--bf16"]),
    "plain_dp2": (2, []),
    # 83M parameters: gradients (330 MB) far above a bucket, so the overlapped reduce's in-flight copies show
    "plain_dp2_wide": (2, WIDE),
    "plain_dp2_wide_sync": (2, WIDE + ["--no-overlap-grad-reduce"]),
}


def _kib(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))


def _flags(name: str, tmp: str) -> list[str]:
    world, extra = CONFIGS[name]
    flags = MODEL + extra
    if "--deepspeed" in extra:
        path = os.path.join(tmp, f"{name}.json")
        conf = json.loads(json.dumps(DS_JSON))
        stage = int(extra[extra.index("--zero-stage") + 1])
        conf["zero_optimization"]["stage"] = stage
        if "--offload-optimizer" in extra:
            conf["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        with open(path, "w") as f:
            json.dump(conf, f)
        flags = [f for f in flags if f not in ("--deepspeed", "--offload-optimizer")]
        i = flags.index("--zero-stage")
        flags = flags[:i] + flags[i + 2:] + ["--deepspeed_config", path]
    return flags


WARMUP = ["--hidden-size", "64", "--num-attention-heads", "2", "--vocab-size", "128", "--seq-length", "16",
          "--train-iters", "2"]


def _train(flags: list[str], world: int, rank: int) -> int:
    """Train --train-iters steps of the configuration; returns the peak growth of the resident set (bytes)."""
    import torch.distributed as dist

    from megatron_est.arguments import parse_args
    from megatron_est.validation import validate
    from megatron_est.est.build import build_sampler
    from megatron_est.model.build import build_model
    from megatron_est.parallel.layout import Layout
    from megatron_est.parallel.state import ParallelState, build_groups
    from megatron_est.training.batches import MicroBatches, RandomTokens
    from megatron_est.training.build import build_engine
    from megatron_est.training.loop import train
    from megatron_est.training.metrics import MetricsLog

    cfg = validate(parse_args(flags, "bench", "gpt2-tiny"), world).config  # the JSON's stage and precision
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    st = build_groups(ParallelState(world, rank, tp, pp, Layout.of(world, tp, pp).dp))
    gbs = cfg.train.global_batch_size
    batches = MicroBatches(RandomTokens(cfg.model.vocab_size, cfg.model.seq_length, n=256), gbs,
                           cfg.train.micro_batch_size, st.dp, st.dp_rank)
    log = MetricsLog(None, enabled=False)
    gc.collect()
    dist.barrier()
    base = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    engine = build_engine(cfg, st, build_model(cfg, st))
    train(cfg, st, engine, build_sampler(cfg), batches, None, log=log)
    peak = (_kib("VmHWM") - base) * 1024
    dist.barrier()
    engine.close()
    return peak


def _worker(rank: int, world: int, port: int, name: str, flags: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if "--deepspeed_config" in flags:
        from megatron_est.training import deepspeed_engine as dse

        dse.import_deepspeed()
    # A tiny run of the same configuration first: the code it loads (optimizer, autograd and DeepSpeed kernels,
    # tens of MiB of library pages) is then resident before the baseline and is not counted as tensor memory.
    _train(flags + WARMUP, world, rank)
    peak = _train(flags, world, rank)
    pp_rank = rank // (world // _pp(flags)) if _pp(flags) > 1 else 0
    with open(os.path.join(out, f"{name}.{rank}.json"), "w") as f:
        json.dump({"rank": rank, "pp_rank": pp_rank, "peak": peak}, f)
    dist.destroy_process_group()


def _pp(flags: list[str]) -> int:
    return int(flags[flags.index("--pipeline-model-parallel-size") + 1]) if "--pipeline-model-parallel-size" in flags \
        else 1


def estimated(flags: list[str], world: int) -> tuple[list[float], float | None]:
    """The memory model's peak (device + host) per pipeline stage for the measured steps, and DeepSpeed's own
    estimate of the model states per GPU (estimate_zero2/3_model_states_mem_needs, ZeRO rows only)."""
    from megatron_est.arguments import parse_args
    from megatron_est.validation import validate
    from megatron_est.planning.dry_run import rank_memory
    from megatron_est.planning.memory import engine_plan
    from megatron_est.planning.params import rank_params

    cfg = validate(parse_args(flags, "bench", "gpt2-tiny"), world).config  # the JSON's stage and precision
    ours = [m.peak + m.host for m in rank_memory(cfg, world, iteration=cfg.train.train_iters - 1)]
    if not cfg.engine.deepspeed or cfg.engine.zero_stage not in (2, 3):  # DeepSpeed estimates ZeRO-2/3
        return ours, None
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p = rank_params(cfg, 0, 0)
    offload = engine_plan(cfg).offload_optimizer  # from the JSON's zero_optimization.offload_optimizer
    if cfg.engine.zero_stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(p.total, p.largest_layer, world, 1, cpu_offload=offload,
                                                          cpu_offload_params=False)
    else:
        _, gpu = estimate_zero2_model_states_mem_needs(p.total, world, 1, cpu_offload=offload)
    return ours, float(gpu)


def measure(name: str) -> list[dict]:
    world = CONFIGS[name][0]
    with tempfile.TemporaryDirectory() as tmp:
        flags = _flags(name, tmp)
        os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1")
        mp.start_processes(_worker, args=(world, free_port(), name, flags, tmp), nprocs=world, start_method="spawn")
        ranks = [json.load(open(os.path.join(tmp, f"{name}.{r}.json"))) for r in range(world)]
        est, ds = estimated(flags, world)
    return [{"config": name, "rank": r["rank"], "measured": r["peak"], "estimated": est[r["pp_rank"]],
             "deepspeed_states": ds} for r in ranks]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    print("| config | measured peak (MiB) | estimated (MiB) | error | DeepSpeed estimator, model states (MiB) |")
    print("|---|---|---|---|---|")
    for name in args.only:
        per_rank = measure(name)
        worst = max(per_rank, key=lambda r: r["measured"])
        err = worst["estimated"] / worst["measured"] - 1
        rows.append({**worst, "error": err})
        ds = worst["deepspeed_states"]
        ds_text = "-" if ds is None else f"{ds / 2**20:.1f} ({100 * (ds / worst['measured'] - 1):+.0f}%)"
        print(f"| {name} | {worst['measured'] / 2**20:.1f} | {worst['estimated'] / 2**20:.1f} | {100 * err:+.1f}% | "
              f"{ds_text} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
