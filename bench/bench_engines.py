#!/usr/bin/env python
"""Peak memory per rank and step time: the plain torch engine against DeepSpeed ZeRO-1/2/3, same model and data.

Each engine runs in a fresh group of data-parallel processes (gloo on CPU, NCCL on GPU), so one engine's memory
never counts against the next. Per rank it reports:
  - peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the growth of the resident set over the
    process's size before the model was built (Linux VmHWM, reset after imports and process-group set-up), i.e.
    model states (weights, gradients, optimizer state, DeepSpeed's buffers) plus activations;
  - model-state bytes: what the engine keeps between steps, counted from the tensors (weights, gradients,
    AdamW moments, and for DeepSpeed its fp32 partitions and flat buffers as far as its public attributes say);
  - step time: median over the measured steps (after warm-up steps).

    python bench/bench_engines.py                        # 8 layers, hidden 512, DP=2, fp32 (the docs' table)
    python bench/bench_engines.py --engines plain zero3 --num-layers 4 --hidden-size 256 --steps 4
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench.common import free_port  # noqa: E402

ENGINES = ("plain", "zero1", "zero2", "zero3", "zero2_offload")


def _mem_kib(key: str) -> int:
    text = open("/proc/self/status").read()
    return int(re.search(key + r":\s+(\d+)", text).group(1))


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _optimizer_tensors(opt) -> list:
    out = []
    for state in getattr(opt, "state", {}).values():
        out += [v for v in state.values() if torch.is_tensor(v)]
    for group in getattr(opt, "param_groups", []):
        out += list(group["params"])
        out += [p.grad for p in group["params"]]
    return out


def _deepspeed_state_tensors(engine) -> list:
    out = [p for p in engine.module.parameters()] + [getattr(p, "ds_tensor", None) for p in engine.module.parameters()]
    out += [p.grad for p in engine.module.parameters()]
    zopt = engine.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "bit16_groups_flat",
                 "fp16_partitioned_groups_flat"):
        for t in getattr(zopt, name, []) or []:
            out += [t, getattr(t, "grad", None)]
    inner = getattr(zopt, "optimizer", None)
    if inner is not None:
        out += _optimizer_tensors(inner)
    return out


def _worker(rank: int, world: int, port: int, args, engine_name: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    from megatron_est.config import (CheckpointConfig, Config, EngineConfig, ESTConfig, ModelConfig, ParallelConfig, TrainConfig)
    from megatron_est.validation import validate
    from megatron_est.est.build import build_sampler
    from megatron_est.model.build import build_model
    from megatron_est.parallel.state import ParallelState, build_groups
    from megatron_est.training.batches import MicroBatches, RandomTokens
    from megatron_est.training.build import build_engine
    from megatron_est.training.loop import train
    from megatron_est.training.metrics import MetricsLog

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    if engine_name != "plain":
        from megatron_est.training import deepspeed_engine as dse

        dse.import_deepspeed()
    ds_engine = {"plain": {}, "zero1": {"deepspeed": True, "zero_stage": 1},
                 "zero2": {"deepspeed": True, "zero_stage": 2}, "zero3": {"deepspeed": True, "zero_stage": 3},
                 "zero2_offload": {"deepspeed": True, "zero_stage": 2, "offload_optimizer": True}}[engine_name]
    model_cfg = ModelConfig(family=args.family, num_layers=args.num_layers, hidden_size=args.hidden_size,
                            num_attention_heads=args.num_attention_heads, vocab_size=args.vocab_size,
                            seq_length=args.seq_length)
    iters = args.warmup + args.steps
    cfg = Config(model=model_cfg, parallel=ParallelConfig(),
                 est=ESTConfig(schedule=args.est_schedule),
                 train=TrainConfig(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                                   train_iters=iters, lr_warmup_iters=1, log_interval=1, eval_interval=10 ** 9,
                                   seed=1),
                 checkpoint=CheckpointConfig(), engine=EngineConfig(bf16=args.bf16, **ds_engine))
    cfg = validate(cfg, world).config  # as the entry point runs it
    st = build_groups(ParallelState(world, rank, 1, 1, world,
                                    device=torch.device("cuda", rank) if cuda else torch.device("cpu")))
    data = RandomTokens(model_cfg.vocab_size, model_cfg.seq_length, n=4096, seed=0)
    batches = MicroBatches(data, args.global_batch_size, args.micro_batch_size, st.dp, st.dp_rank)
    gc.collect()
    dist.barrier()
    base_kib = _mem_kib("VmRSS")
    _reset_peak()
    engine = build_engine(cfg, st, build_model(cfg, st))
    state = train(cfg, st, engine, build_sampler(cfg), batches, None, log=MetricsLog(None, enabled=False))
    model = engine.module
    if engine_name == "plain":
        state_bytes = _tensor_bytes(list(model.parameters()) + [p.grad for p in model.parameters()]
                                    + _optimizer_tensors(engine.optimizer))
    else:
        state_bytes = _tensor_bytes(_deepspeed_state_tensors(engine.engine))
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        peak_kind = "cuda max_memory_allocated"
    else:
        peak = (_mem_kib("VmHWM") - base_kib) * 1024
        peak_kind = "RSS growth (VmHWM - RSS before the model)"
    times = [r["step_time_s"] for r in state.history if "step_time_s" in r][args.warmup:]
    losses = [r["lm_loss"] for r in state.history if "lm_loss" in r]
    result = {"engine": engine_name, "rank": rank, "peak_bytes": peak, "peak_kind": peak_kind,
              "state_bytes": state_bytes, "step_time_s": statistics.median(times), "params": n_params,
              "final_loss": losses[-1]}
    with open(os.path.join(out_dir, f"{engine_name}.{rank}.json"), "w") as f:
        json.dump(result, f)
    engine.close()
    del engine, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs="+", default=["plain", "zero1", "zero2", "zero3"], choices=ENGINES)
    p.add_argument("--data-parallel-size", type=int, default=2)
    p.add_argument("--family", default="gpt2")
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--est-schedule", default="none", help="'none' (full model) or an EST schedule")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for name in args.engines:
            t0 = time.perf_counter()
            mp.start_processes(_worker, args=(args.data_parallel_size, free_port(), args, name, out),
                               nprocs=args.data_parallel_size, start_method="spawn")
            per_rank = [json.load(open(os.path.join(out, f"{name}.{r}.json")))
                        for r in range(args.data_parallel_size)]
            rows.append({"engine": name, "peak_mib_per_rank": [round(r["peak_bytes"] / 2 ** 20, 1) for r in per_rank],
                         "state_mib_per_rank": [round(r["state_bytes"] / 2 ** 20, 1) for r in per_rank],
                         "step_time_s": round(max(r["step_time_s"] for r in per_rank), 3),
                         "final_loss": round(per_rank[0]["final_loss"], 5), "params": per_rank[0]["params"],
                         "peak_kind": per_rank[0]["peak_kind"], "wall_s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"model: {args.family}, {args.num_layers} layers, hidden {args.hidden_size}, vocab {args.vocab_size}, "
          f"seq {args.seq_length}, {rows[0]['params'] / 1e6:.1f}M parameters; DP={args.data_parallel_size}, "
          f"micro-batch {args.micro_batch_size}, global batch {args.global_batch_size}, "
          f"{'bf16' if args.bf16 else 'fp32'}, EST schedule {args.est_schedule}; peak = {rows[0]['peak_kind']}")
    print()
    print("| engine | peak memory per rank (MiB) | model-state tensors per rank (MiB) | step time (s) | loss after "
          f"{args.warmup + args.steps} steps |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {' / '.join(map(str, r['peak_mib_per_rank']))} | "
              f"{' / '.join(map(str, r['state_mib_per_rank']))} | {r['step_time_s']:.3f} | {r['final_loss']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
