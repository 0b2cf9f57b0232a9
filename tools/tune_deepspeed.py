#!/usr/bin/env python
"""Pick a DeepSpeed plan for a cluster in seconds: ZeRO stage, TP, PP, micro-batch, recompute, offload.

    python tools/tune_deepspeed.py --model-preset tinyllama-1.1b --nodes 2 --gpus-per-node 8 --gpu-memory-gib 80 \
        --seq-length 2048 --global-batch-size 512 --est-schedule tinyllama-paper --train-iters 50000 --out plan/

Every other flag is a training flag (model, batch, EST schedule, precision: --bf16 is the default here). Plans
that training refuses are dropped (validation.validate), then those whose estimated peak leaves less than
--memory-margin of the GPU free (planning/memory.py, for every EST stage and pipeline stage); the rest are
ranked by estimated time to train the schedule (planning/step_time.py: FLOPs at --mfu of --peak-tflops, ZeRO,
TP and PP traffic over --intra-node-gbps / --inter-node-gbps, the 1F1B bubble). Writes to --out:
ds_config.json (pass it with --deepspeed_config), plan.flags (the training flags, one line) and plan.env (the
variables examples/slurm/*.sbatch read: `source plan.env; sbatch --nodes $NODES ...`).

--measure-top-k K runs the K best plans for --measure-steps steps each with --launcher (on the cluster, inside
the allocation; on CPU in the tests) and re-ranks them by measured step time.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_est.arguments import parse_args  # noqa: E402
from megatron_est.config import ConfigError  # noqa: E402
from megatron_est.validation import validate  # noqa: E402
from megatron_est.planning.memory import GiB  # noqa: E402
from megatron_est.planning.step_time import Cluster  # noqa: E402
from megatron_est.planning.tuner import (Evaluated, candidate_config, candidates, deepspeed_json,  # noqa: E402
                                         describe, explain, plan_flags, progress_bar, sbatch_env, search)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    g = p.add_argument_group("cluster")
    g.add_argument("--nodes", type=int, required=True)
    g.add_argument("--gpus-per-node", type=int, required=True)
    g.add_argument("--gpu-memory-gib", type=float, required=True)
    d = Cluster(1, 1, 1)
    for name, default, what in (("peak-tflops", d.peak_tflops, "dense bf16 peak per GPU"),
                                ("mfu", d.mfu, "fraction of the peak the matmuls reach"),
                                ("intra-node-gbps", d.intra_node_gbps, "GB/s per GPU inside a node"),
                                ("inter-node-gbps", d.inter_node_gbps, "GB/s per GPU between nodes"),
                                ("pcie-gbps", d.pcie_gbps, "GB/s host <-> GPU"),
                                ("launch-overhead-s", d.launch_overhead_s, "per kept layer and micro-batch")):
        g.add_argument(f"--{name}", type=float, default=default, help=f"{what} (default {default:g})")
    t = p.add_argument_group("tuner")
    t.add_argument("--memory-margin", type=float, default=0.10, help="fraction of GPU memory kept free")
    t.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    t.add_argument("--top", type=int, default=10, help="rows of the table")
    t.add_argument("--out", default="tuned_plan", help="directory for ds_config.json, plan.flags, plan.env")
    t.add_argument("--measure-top-k", type=int, default=0)
    t.add_argument("--measure-steps", type=int, default=4)
    t.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m torch.distributed.run --standalone "
                                         "--nproc-per-node {world}",
                   help="command that starts {world} ranks ({world} is replaced)")
    return p


def _cluster(a: argparse.Namespace) -> Cluster:
    for flag, v in (("--nodes", a.nodes), ("--gpus-per-node", a.gpus_per_node)):
        if v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    if a.gpu_memory_gib <= 0 or not 0 < a.mfu <= 1 or not 0 <= a.memory_margin < 1:
        raise ConfigError("--gpu-memory-gib must be > 0, --mfu in (0, 1] and --memory-margin in [0, 1)")
    return Cluster(a.nodes, a.gpus_per_node, a.gpu_memory_gib, a.peak_tflops, a.mfu, a.intra_node_gbps,
                   a.inter_node_gbps, a.pcie_gbps, launch_overhead_s=a.launch_overhead_s)


def _row(i: int, ev: Evaluated) -> str:
    c = ev.cand
    measured = f"{ev.measured_step:.3f}" if ev.measured_step is not None else "-"
    return (f"| {i} | {c.zero_stage}{'+off' if c.offload else ''} | {c.tp} | {c.pp} | {ev.dp} | {c.micro_batch} | "
            f"{c.recompute or 'off'} | {ev.peak / GiB:.1f} | {ev.free / GiB:+.1f} | {ev.full_step.total:.3f} | "
            f"{ev.train_time / 3600:.2f} | {measured} |")


def print_table(fit: list[Evaluated], too_big: list[Evaluated], top: int) -> None:
    print("| # | ZeRO | TP | PP | DP | micro-batch | recompute | peak GiB | free GiB | full step s | "
          "train h | measured step s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, ev in enumerate(fit[:top], 1):
        print(_row(i, ev))
    if too_big:
        closest = sorted(too_big, key=lambda ev: -ev.free)[:3]
        print("closest plans that do not fit (free GiB below the margin):")
        for ev in closest:
            print(_row(0, ev))


def measure(fit: list[Evaluated], k: int, steps: int, launcher: str, train_argv: list[str], cfg, cl: Cluster,
            precision: str, out: str) -> list[Evaluated]:
    """Run the top k for `steps` steps each; re-rank them by the median measured step time (first step left out)."""
    import dataclasses

    entry = os.path.join(ROOT, "pretrain_llama.py" if cfg.model.family == "llama" else "pretrain_gpt.py")
    done = []
    for i, ev in enumerate(fit[:k]):
        path = os.path.join(out, f"measure_{i}.json")
        with open(path, "w") as f:
            json.dump(deepspeed_json(cfg, ev, precision), f, indent=1)
        metrics = os.path.join(out, f"measure_{i}.jsonl")
        argv = shlex.split(launcher.format(world=cl.world)) + [entry, *train_argv, *plan_flags(cfg, ev, path),
                                                               "--train-iters", str(steps), "--log-interval", "1",
                                                               "--eval-interval", str(10 ** 9),
                                                               "--metrics-file", metrics]
        print(f"measuring plan {i + 1}/{k}: {describe(ev.cand)}", file=sys.stderr, flush=True)
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        times = [json.loads(line).get("step_time_s") for line in open(metrics)]
        times = [t for t in times if t is not None][1:] or [t for t in times if t is not None]
        done.append(dataclasses.replace(ev, measured_step=statistics.median(times)))
    return sorted(done, key=lambda ev: ev.measured_step) + [ev for ev in fit if ev not in fit[:k]]


def write_plan(out: str, cfg, cl: Cluster, best: Evaluated, precision: str, train_argv: list[str]) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.abspath(os.path.join(out, "ds_config.json"))
    with open(path, "w") as f:
        json.dump(deepspeed_json(cfg, best, precision), f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "plan.flags"), "w") as f:
        f.write(shlex.join([*train_argv, *plan_flags(cfg, best, path)]) + "\n")
    with open(os.path.join(out, "plan.env"), "w") as f:
        f.write(sbatch_env(cl, cfg, best, path))
    return path


def main(argv: list[str] | None = None) -> Evaluated:
    args, train_argv = _parser().parse_known_args(argv)
    if args.precision != "fp32" and f"--{args.precision}" not in train_argv:
        train_argv = [*train_argv, f"--{args.precision}"]
    try:
        cl = _cluster(args)
        cfg = parse_args(train_argv, "tune", "gpt2-124m")
        if cfg.train.global_batch_size is None:
            raise ConfigError("--global-batch-size is required (the tuner splits it over the data-parallel ranks)")
        fit, too_big, refused = search(cfg, cl, args.memory_margin, progress_bar)
        first = next(candidates(cfg, cl), None)
        if not fit and not too_big and first is not None:  # every plan refused: training's reason for one
            validate(candidate_config(cfg, first, cl.world), cl.world)
        if not fit:
            raise ConfigError(f"no plan fits {args.gpu_memory_gib:g} GiB per GPU with --memory-margin "
                              f"{args.memory_margin:g} ({len(too_big)} too big, {refused} refused layouts)")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.measure_top_k:
        with tempfile.TemporaryDirectory() as tmp:
            fit = measure(fit, args.measure_top_k, args.measure_steps, args.launcher, train_argv, cfg, cl,
                          args.precision, tmp)
    m = cfg.model
    print(f"model {m.family} {m.num_layers}L h{m.hidden_size}, seq {m.seq_length}, global batch "
          f"{cfg.train.global_batch_size}; cluster {cl.nodes} x {cl.gpus_per_node} GPUs x {cl.gpu_memory_gib:g} GiB; "
          f"{args.precision}; MFU {cl.mfu:g} of {cl.peak_tflops:g} TFLOP/s; links {cl.intra_node_gbps:g} / "
          f"{cl.inter_node_gbps:g} GB/s")
    print_table(fit, too_big, args.top)
    best = fit[0]
    path = write_plan(args.out, cfg, cl, best, args.precision, train_argv)
    print(explain(best, fit, too_big, refused, cl))
    print(f"wrote {path}, {os.path.join(args.out, 'plan.flags')}, {os.path.join(args.out, 'plan.env')}")
    return best


if __name__ == "__main__":
    main()
