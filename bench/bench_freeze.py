#!/usr/bin/env python
"""What --est-unsampled-update freeze costs over adamw: optimizer steps of both modes side by side, interleaved.

    python bench/bench_freeze.py --layout pp2          # plain engine, 2 pipeline stages (2 processes, gloo)
    python bench/bench_freeze.py --layout zero3        # DeepSpeed ZeRO-3, data-parallel size 2
    python bench/bench_freeze.py --layout single       # plain engine, one process

Each rank builds the same model twice, one run per mode, and alternates whole optimizer steps (forward, backward,
gradient sync, clip, AdamW; freeze adds its save and write-back) on EST stage-1 subnetworks (0.5, 0.5, 0.5), so
machine noise hits both modes alike. Printed: the median step time of each mode on rank 0 (after a barrier per
step) and their ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench.common import free_port, interleaved_times, median  # noqa: E402
from megatron_est.config import Config, EngineConfig, ESTConfig, ParallelConfig, TrainConfig, model_preset  # noqa: E402
from megatron_est.validation import validate  # noqa: E402
from megatron_est.est.build import build_sampler  # noqa: E402
from megatron_est.model.build import build_model  # noqa: E402
from megatron_est.parallel.state import ParallelState, build_groups  # noqa: E402
from megatron_est.training.batches import MicroBatches, RandomTokens  # noqa: E402
from megatron_est.training.build import build_engine  # noqa: E402

LAYOUTS = {"single": (1, 1, False), "pp2": (2, 2, False), "zero3": (2, 1, True)}  # world, pp, deepspeed


def _cfg(args, pp: int, deepspeed: bool, mode: str) -> Config:
    model = model_preset("gpt2-tiny", num_layers=args.num_layers, hidden_size=args.hidden_size,
                         seq_length=args.seq_length, vocab_size=1024)
    engine = EngineConfig(deepspeed=True, zero_stage=3) if deepspeed else EngineConfig()
    return Config(model=model, parallel=ParallelConfig(pipeline_model_parallel_size=pp),
                  est=ESTConfig(schedule="0:0.5,0.5,0.5", unsampled_update=mode),
                  train=TrainConfig(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                                    train_iters=10 ** 6, lr_warmup_iters=0), engine=engine)


def _step_fn(cfg: Config, st: ParallelState, batches: MicroBatches):
    """One optimizer step of this mode's own model and optimizer, as training/loop.py takes it."""
    if cfg.engine.deepspeed:
        cfg = validate(cfg, st.world_size).config  # as the entry point runs it
    engine = build_engine(cfg, st, build_model(cfg, st))
    sampler, counter = build_sampler(cfg), {"it": 0}

    def one() -> None:
        it = counter["it"]
        counter["it"] += 1
        if st.world_size > 1:
            dist.barrier()
        engine.step(batches, sampler(it), it)
    return one


def _worker(rank: int, world: int, port: int, args, pp: int, deepspeed: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    st = ParallelState()
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        st = build_groups(ParallelState(world, rank, 1, pp, world // pp))
    base = _cfg(args, pp, deepspeed, "adamw")
    data = RandomTokens(base.model.vocab_size, base.model.seq_length, n=64, seed=0)
    batches = MicroBatches(data, args.global_batch_size, args.micro_batch_size, st.dp, st.dp_rank)
    variants = {mode: _step_fn(dataclasses.replace(base, est=dataclasses.replace(base.est, unsampled_update=mode)),
                               st, batches) for mode in ("adamw", "freeze")}
    times = interleaved_times(variants, args.reps, warmup=2)
    if rank == 0:
        torch.save({k: median(v) for k, v in times.items()}, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="pp2")
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--global-batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    world, pp, deepspeed = LAYOUTS[args.layout]
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_freeze_{os.getpid()}.pt")
    mp.start_processes(_worker, args=(world, free_port(), args, pp, deepspeed, out), nprocs=world,
                       start_method="spawn")
    med = torch.load(out)
    os.remove(out)
    print(f"# bench_freeze: layout {args.layout}, gpt2 {args.num_layers}L h{args.hidden_size} seq {args.seq_length}, "
          f"micro-batch {args.micro_batch_size}, global batch {args.global_batch_size}, {args.reps} rounds, "
          f"EST stage 1 (0.5,0.5,0.5)")
    print("| mode | median step s | vs adamw |")
    print("|---|---|---|")
    for mode in ("adamw", "freeze"):
        print(f"| {mode} | {med[mode]:.4f} | {med[mode] / med['adamw']:.3f} |")
    return med


if __name__ == "__main__":
    main()
