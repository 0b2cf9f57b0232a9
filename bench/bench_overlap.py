#!/usr/bin/env python
"""Data-parallel gradient reduction at DP 2 (gloo): the plain engine's synchronous all-reduce after backward, its
overlapped bucketed reduction (parallel/grad_overlap.py) and torch DDP, same model, data and optimizer, next to
"local": the same step with no reduction at all (each rank keeps its own gradients: not training, the floor).

    OMP_NUM_THREADS=1 python bench/bench_overlap.py                          # GPT-2 shape 8L h512, seq 256
    python bench/bench_overlap.py --num-layers 4 --hidden-size 256 --reps 4

Each process builds one model per variant (same seed) and alternates whole steps (a barrier before each):
zero_grad, forward + backward over the micro-batches (DDP: no_sync for all but the last), the reduction, clipping,
torch's fused AdamW. Stages: the full model, and EST stage 1 (0.5, 0.5, 0.5) where DDP needs
find_unused_parameters (skipped layers get no gradient). Printed: rank 0's median step time per variant, the
ratio to DDP's, and what the reduction added over "local" (its exposed cost: step-time noise of a few rounds is
about as large, so read it over several runs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from bench.common import free_port, median  # noqa: E402
from megatron_est.config import TrainConfig, model_preset  # noqa: E402
from megatron_est.host_memory import keep_freed_memory  # noqa: E402
from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges  # noqa: E402
from megatron_est.est.schedule import Schedule, Stage  # noqa: E402
from megatron_est.model.language_model import LanguageModel  # noqa: E402
from megatron_est.parallel.grad_overlap import OverlappedGradReduce  # noqa: E402
from megatron_est.parallel.grads import grad_norm_and_clip, sync_data_parallel_grads  # noqa: E402
from megatron_est.parallel.state import ParallelState, build_groups  # noqa: E402
from megatron_est.training.optimizer import build_optimizer  # noqa: E402

STAGES = {"full": (1.0, 1.0, 1.0), "stage1": (0.5, 0.5, 0.5)}
VARIANTS = ("local", "sync", "overlap", "ddp")


def _variant(kind: str, stage: str, cfg, st: ParallelState, tokens: list[torch.Tensor]):
    model = LanguageModel(cfg, st, seed=0)
    opt = build_optimizer(model, TrainConfig())
    params = list(model.parameters())
    sampler = SubnetworkSampler(cfg, Schedule((Stage(0, *STAGES[stage]),)), 0,
                                Strata(1, 1, even_ranges(cfg.num_layers, 1)))
    ddp = DistributedDataParallel(model, find_unused_parameters=stage != "full") if kind == "ddp" else None
    reducer = OverlappedGradReduce(params, st.dp_group, st.dp) if kind == "overlap" else None
    counter = {"it": 0}

    def step() -> None:
        counter["it"] += 1
        plan = model.make_plan(sampler(counter["it"]))
        opt.zero_grad(set_to_none=True)
        if reducer is not None:
            reducer.begin(model.skipped_parameters(plan), len(tokens))
        for i, t in enumerate(tokens):
            if ddp is not None and i < len(tokens) - 1:
                with ddp.no_sync():
                    ddp(t[:, :-1], t[:, 1:], plan).mean().backward()
            else:
                (ddp or model)(t[:, :-1], t[:, 1:], plan).mean().backward()
        if reducer is not None:
            reducer.finish()
        elif kind == "sync":
            sync_data_parallel_grads(params, st.dp_group, st.dp)
        grad_norm_and_clip(params, 1.0, None, 1)
        opt.step()
    return step


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    keep_freed_memory(True, "cpu")  # as a CPU training rank does (megatron_est/host_memory.py), for every variant
    dist.init_process_group("gloo", rank=rank, world_size=world)
    st = build_groups(ParallelState(world, rank, 1, 1, world))
    cfg = model_preset("gpt2-124m", num_layers=args.num_layers, hidden_size=args.hidden_size,
                       num_attention_heads=args.hidden_size // 64, seq_length=args.seq_length)
    g = torch.Generator().manual_seed(rank)
    tokens = [torch.randint(0, cfg.vocab_size, (args.micro_batch_size, cfg.seq_length + 1), generator=g)
              for _ in range(args.micro_batches)]
    steps = {(k, s): _variant(k, s, cfg, st, tokens) for s in STAGES for k in VARIANTS}
    times = {key: [] for key in steps}
    for rnd in range(args.reps + 1):  # round 0 warms up
        for key, fn in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if rnd:
                times[key].append(time.perf_counter() - t0)
    if rank == 0:
        torch.save({"times": times, "params": sum(p.numel() for p in LanguageModel(cfg, st).parameters())}, out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=2, help="gradient accumulation steps")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_overlap_{os.getpid()}.pt")
    load_start = os.getloadavg()
    mp.start_processes(_worker, args=(2, free_port(), args, out), nprocs=2, start_method="spawn")
    res = torch.load(out)
    os.remove(out)
    load_end = os.getloadavg()
    print(f"# bench_overlap: DP 2 gloo, gpt2 {args.num_layers}L h{args.hidden_size} ({res['params'] / 1e6:.1f}M "
          f"params), seq {args.seq_length}, micro-batch {args.micro_batch_size} x {args.micro_batches}, "
          f"{args.reps} rounds, threads {args.threads}; load average at start "
          f"{', '.join(f'{x:.1f}' for x in load_start)}, at end {', '.join(f'{x:.1f}' for x in load_end)}")
    print("| stage | variant | median step s | vs DDP | over local s |")
    print("|---|---|---|---|---|")
    for stage in STAGES:
        ddp, local = (median(res["times"][(k, stage)]) for k in ("ddp", "local"))
        for kind in VARIANTS:
            t = median(res["times"][(kind, stage)])
            print(f"| {stage} | {kind} | {t:.3f} | {t / ddp:.3f} | {t - local:+.3f} |")


if __name__ == "__main__":
    main()
