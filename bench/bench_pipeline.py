"""Pipeline-parallel EST stage-1 steps: per-stage busy time and bubble, stratified against unstratified layer
sampling, next to full-model steps, all in one run (interleaved, so machine noise hits every variant alike).
"Stratified" uses strata lined up with the layout (est/balance.balancing_strata: --est-tp-strata TP and layer
ranges that every stage boundary divides); "unstratified" draws uniformly, as the default strata (1) do.

    python bench/bench_pipeline.py                         # layouts TP1xPP2 and TP2xPP2 (gloo, CPU)
    python bench/bench_pipeline.py --layouts 1x2 --reps 8 --vocab-size 1024

Each layout spawns TP x PP gloo processes (one thread each). Every round runs one training step (1F1B forward
and backward over all micro-batches, gradient sync, clip, AdamW) per variant, in rotating order, each step with
a freshly sampled subnetwork. Columns:
  step s, step time ratio     median wall time of a whole step, and its ratio to the full model's
  fwd+bwd time ratio          the same for the 1F1B schedule alone (no optimizer)
  FLOPs share                 step FLOPs / full-model step FLOPs (what perfect balance would save)
  bottleneck-stage share      mean over steps of max-over-stages FLOPs / the full model's (a pipeline runs at
                              the pace of its slowest stage)
  critical-path CPU ratio     mean over steps of max-over-stages busy CPU time, relative to the full model's:
                              the measured counterpart of the bottleneck share, immune to other jobs' load
  stage imbalance             mean over steps of max / mean stage busy CPU time (1.00 = perfectly balanced)
  busy CPU s / bubble         per stage: median forward+backward CPU seconds per step, and the median share of
                              the schedule's wall time not spent computing (waiting on the other stage)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import free_port  # noqa: E402
from megatron_est.config import Config, ESTConfig, ParallelConfig, TrainConfig, model_preset  # noqa: E402
from megatron_est.parallel.layout import Layout  # noqa: E402
from megatron_est.parallel.partition import stage_ranges  # noqa: E402
from megatron_est.est.build import build_sampler  # noqa: E402
from megatron_est.est.balance import balancing_strata  # noqa: E402
from megatron_est.est.flops import stage_step_flops  # noqa: E402
from megatron_est.model.build import build_model  # noqa: E402
from megatron_est.parallel.state import ParallelState, build_groups  # noqa: E402
from megatron_est.training.batches import MicroBatches, RandomTokens  # noqa: E402
from megatron_est.training.engine import TorchEngine  # noqa: E402
from megatron_est.training.pipeline_schedule import StageTimer  # noqa: E402

VARIANTS = {"full": ("none", True), "stage1 stratified": ("0:0.5,0.5,0.5", True),
            "stage1 unstratified": ("0:0.5,0.5,0.5", False)}


def _config(args: argparse.Namespace, tp: int, pp: int, schedule: str, stratified: bool) -> Config:
    model = _model(args)
    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         decoder_first_pipeline_num_layers=args.first_stage_layers,
                         decoder_last_pipeline_num_layers=args.last_stage_layers,
                         pipeline_partition=args.pipeline_partition)
    gbs = args.micro_batch_size * args.micro_batches
    tr = TrainConfig(micro_batch_size=args.micro_batch_size, global_batch_size=gbs, train_iters=10**6,
                     lr_warmup_iters=0)
    cfg = Config(model=model, parallel=par, est=ESTConfig(schedule=schedule, stratified=stratified), train=tr)
    if stratified:  # strata lined up with this layout (est/balance.py), where any of 2+ units do
        tp_strata, pp_strata = balancing_strata(cfg)
        cfg = dataclasses.replace(cfg, est=dataclasses.replace(cfg.est, tp_strata=tp_strata or 1,
                                                               pp_strata=pp_strata or 1))
    return cfg


def _model(args: argparse.Namespace):
    extra = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    return model_preset(args.preset, num_layers=args.num_layers, seq_length=args.seq_length, **extra)


def _stage_flops(cfg: Config, sub, tokens: int) -> list[int]:
    ranges = stage_ranges(cfg)
    return [stage_step_flops(cfg.model, tokens, sub, r, with_head=(i == len(ranges) - 1))
            for i, r in enumerate(ranges)]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, tp: int, pp: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    st = build_groups(ParallelState(world, rank, tp, pp, Layout.of(world, tp, pp).dp))
    runs = {}
    for name, (schedule, stratified) in VARIANTS.items():
        cfg = _config(args, tp, pp, schedule, stratified)
        model = build_model(cfg, st)
        data = RandomTokens(cfg.model.vocab_size, cfg.model.seq_length, n=4 * cfg.train.global_batch_size)
        runs[name] = (cfg, TorchEngine(cfg, st, model), build_sampler(cfg),
                      MicroBatches(data, cfg.train.global_batch_size, cfg.train.micro_batch_size, st.dp, st.dp_rank))
    results = {name: [] for name in VARIANTS}
    names = list(runs)
    for rnd in range(args.warmup + args.reps):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:  # rotate: no variant always goes first
            cfg, engine, sampler, batches = runs[name]
            timer, sub = StageTimer(), sampler(rnd)
            dist.barrier()  # every variant's step starts with all stages together
            start = time.perf_counter()
            engine.step(batches, sub, rnd, timer)
            step_s = time.perf_counter() - start
            if rnd >= args.warmup:
                tokens = cfg.train.global_batch_size * cfg.model.seq_length
                results[name].append({"step_s": step_s, "busy_s": timer.busy_s, "cpu_s": timer.busy_cpu_s,
                                      "sched_s": timer.wall_s,
                                      "stage_flops": _stage_flops(cfg, sub, tokens), "kept": sub.layers})
    torch.save({"pp_rank": st.pp_rank, "results": results}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_layout(args: argparse.Namespace, tp: int, pp: int) -> list[dict]:
    world = tp * pp
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, free_port(), args, tp, pp, out), nprocs=world,
                           start_method="spawn")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _critical_cpu(by_stage: dict, name: str) -> list[float]:
    """Per step, the largest stage busy CPU time (mean over the TP/DP ranks of a stage): the step's critical path
    on dedicated cores, free of the noise that other jobs on shared cores add to wall time."""
    n_steps = len(by_stage[0][0][name])
    per_stage = [[statistics.mean(res[name][i]["cpu_s"] for res in by_stage[s]) for s in by_stage]
                 for i in range(n_steps)]
    return [max(row) for row in per_stage], [max(row) / statistics.mean(row) for row in per_stage]


def report(args: argparse.Namespace, tp: int, pp: int, ranks: list[dict]) -> None:
    cfg = _config(args, tp, pp, "none", True)
    by_stage = {s: [r["results"] for r in ranks if r["pp_rank"] == s] for s in range(pp)}
    rank0 = ranks[0]["results"]
    full_step = _med([x["step_s"] for x in rank0["full"]])
    full_sched = _med([x["sched_s"] for x in rank0["full"]])
    full_flops = rank0["full"][0]["stage_flops"]
    full_critical = statistics.mean(_critical_cpu(by_stage, "full")[0])
    print(f"\n### TP={tp} x PP={pp} ({tp * pp} processes), stages {stage_ranges(cfg)}")
    head = " | ".join(f"stage {s} busy CPU s / bubble" for s in range(pp))
    print("| variant | step s | step time ratio | fwd+bwd time ratio | FLOPs share | bottleneck-stage FLOPs share "
          f"| critical-path CPU ratio | stage imbalance | {head} | kept layers per stage (first steps) |")
    print("|---" * (9 + pp) + "|")
    for name in VARIANTS:
        recs = rank0[name]
        ratio = _med([x["step_s"] for x in recs]) / full_step
        sched_ratio = _med([x["sched_s"] for x in recs]) / full_sched
        share = statistics.mean(sum(x["stage_flops"]) / sum(full_flops) for x in recs)
        bottleneck = statistics.mean(max(x["stage_flops"]) / max(full_flops) for x in recs)
        critical, imbalance = _critical_cpu(by_stage, name)
        cells = []
        for s in range(pp):
            busy = _med([x["cpu_s"] for res in by_stage[s] for x in res[name]])
            bubble = _med([1 - x["busy_s"] / x["sched_s"] for res in by_stage[s] for x in res[name]])
            cells.append(f"{busy:.3f} / {100 * bubble:.0f}%")
        kept = " ".join("+".join(str(sum(lo <= i < hi for i in x["kept"])) for lo, hi in stage_ranges(cfg))
                        for x in recs[:6])
        print(f"| {name} | {_med([x['step_s'] for x in recs]):.3f} | {ratio:.3f} | {sched_ratio:.3f} | {share:.3f} "
              f"| {bottleneck:.3f} | {statistics.mean(critical) / full_critical:.3f} | "
              f"{statistics.mean(imbalance):.2f} | {' | '.join(cells)} | {kept} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="1x2,2x2", help="comma-separated TPxPP layouts")
    ap.add_argument("--preset", default="gpt2-tiny")
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the preset's (LM head cost)")
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step (per DP rank)")
    ap.add_argument("--first-stage-layers", type=int, default=None)
    ap.add_argument("--last-stage-layers", type=int, default=None)
    ap.add_argument("--pipeline-partition", default="even", choices=("even", "balanced"))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    m = _model(args)
    print(f"# bench_pipeline: preset {args.preset} ({m.num_layers} layers, hidden {m.hidden_size}, "
          f"vocab {m.padded_vocab_size}), seq {m.seq_length}, micro-batch {args.micro_batch_size} x "
          f"{args.micro_batches} micro-batches, reps {args.reps} (+{args.warmup} warm-up), 1 thread per rank, "
          f"{os.cpu_count()} CPUs")
    for layout in args.layouts.split(","):
        tp, pp = (int(v) for v in layout.lower().split("x"))
        report(args, tp, pp, run_layout(args, tp, pp))


if __name__ == "__main__":
    main()
