"""Wall-clock saving of a whole EST schedule, from step times measured side by side with the full model.

    python bench/bench_schedule_time.py --reps 40 -- --num-layers 4 --hidden-size 64 --num-attention-heads 4 \
        --seq-length 128 --micro-batch-size 32 --vocab-size 1024 --train-iters 2400 --num-threads 1 \
        --est-schedule "0%:0.5,0.5,0.5;25%:0.5,0.5,1;50%:1,1,1"

Flags after `--` are training flags (model, batch, schedule, --est-target-saving, --est-unsampled-update,
--num-threads). Each round times one optimizer step of the full model and one of every sampled stage (a new
subnetwork each step), interleaved so that machine noise hits all alike. A step is the plain engine's step (training/engine.py)
(forward, backward, clip, AdamW over zero-filled gradients or the freeze step) on random tokens. The schedule's wall-clock saving is 1 - sum(stage iterations x median stage step) /
(train iterations x median full step), printed next to its FLOPs saving: what a training run would save on a
quiet machine, without data loading, evaluation or logging. With --processes N the whole measurement runs in N
fresh processes, one after another, and the medians over them are printed with their ranges: ratios move between
processes (where tensors land), so one process is one sample.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import in_fresh_processes, interleaved_times, median, spread  # noqa: E402
from megatron_est.arguments import parse_args  # noqa: E402
from megatron_est.est.build import build_sampler  # noqa: E402
from megatron_est.est.savings import schedule_flops  # noqa: E402
from megatron_est.host_memory import keep_freed_memory  # noqa: E402
from megatron_est.model.language_model import LanguageModel  # noqa: E402
from megatron_est.parallel.state import SINGLE  # noqa: E402
from megatron_est.training.batches import MicroBatches, RandomTokens  # noqa: E402
from megatron_est.training.engine import TorchEngine  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20, help="timed rounds (one step of every variant each)")
    ap.add_argument("--processes", type=int, default=1, help="fresh processes to repeat the measurement in")
    ap.add_argument("--json-out", help="also write the result as JSON here (used by --processes)")
    args = ap.parse_args(ours)
    if args.processes > 1:
        return over_processes(args.reps, args.processes, train_argv)
    cfg = parse_args(train_argv, "bench", "gpt2-tiny")
    torch.set_num_threads(cfg.train.num_threads or torch.get_num_threads())
    host = keep_freed_memory(cfg.engine.keep_host_memory, "cpu")  # as a CPU training run does
    m, tr = cfg.model, cfg.train
    tokens_per_step = tr.micro_batch_size * m.seq_length
    sampler = build_sampler(cfg)
    stages = schedule_flops(m, sampler, tr.train_iters, tokens_per_step)
    model = LanguageModel(m, seed=0)
    engine = TorchEngine(cfg, SINGLE, model)
    data = RandomTokens(m.vocab_size, m.seq_length, n=4 * tr.micro_batch_size, seed=0)
    batches = MicroBatches(data, tr.micro_batch_size, tr.micro_batch_size, 1, 0)
    counters = {st.stage: st.first for st in stages}

    def step(stage: int | None) -> None:
        """One training step exactly as training/loop.py takes it (AdamW or the freeze step)."""
        sub, it = None, 0
        if stage is not None:  # draw as training does, walking through the stage's own iterations
            sub, it = sampler(counters[stage]), counters[stage]
            counters[stage] += 1
        engine.step(batches, sub, it)

    variants = {"full": lambda: step(None)}
    variants.update({f"stage{st.stage}": (lambda s=st.stage: step(s)) for st in stages
                     if st.flops != st.full_flops})
    times = {k: median(v) for k, v in interleaved_times(variants, args.reps).items()}
    print(f"# unsampled parameters: {cfg.est.unsampled_update}; host memory: {host}")
    out = report(stages, times, tr.train_iters, cfg.est.schedule, m, tokens_per_step)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f)
    return out


def over_processes(reps: int, n: int, train_argv: list[str]) -> dict:
    runs = in_fresh_processes(__file__, ["--reps", str(reps), "--", *train_argv], n)
    print(f"# median over {n} processes (min..max)")
    print("| stage | FLOPs ratio | step-time ratio |")
    print("|---|---|---|")
    for k, st in enumerate(runs[0]["stages"]):
        print(f"| {st['stage']} | {st['flops']:.3f} | {spread([r['stages'][k]['time'] for r in runs])} |")
    shares = [r["time_saving"] / r["flops_saving"] for r in runs if r["flops_saving"]]
    print(f"FLOPs saving {100 * runs[0]['flops_saving']:.1f}% | wall-clock saving "
          f"{spread([100 * r['time_saving'] for r in runs], '.1f')}% | ratio {spread(shares, '.2f')}")
    return {"flops_saving": runs[0]["flops_saving"], "time_saving": median([r["time_saving"] for r in runs])}


def report(stages, times: dict[str, float], train_iters: int, schedule: str, m, tokens: int) -> dict:
    print(f"# bench_schedule_time: {m.family} {m.num_layers}L h{m.hidden_size} seq {m.seq_length} vocab "
          f"{m.padded_vocab_size}, {tokens} tokens/step, {train_iters} iterations, schedule {schedule!r}")
    print("| stage | iterations | FLOPs ratio | step-time ratio | median step s |")
    print("|---|---|---|---|---|")
    used_time, rows = 0.0, []
    for st in stages:
        t = times.get(f"stage{st.stage}", times["full"])
        used_time += st.iterations * t
        rows.append({"stage": st.stage, "flops": st.flops / st.full_flops, "time": t / times["full"]})
        print(f"| {st.stage} | {st.iterations} | {st.flops / st.full_flops:.3f} | {t / times['full']:.3f} | "
              f"{t:.4f} |")
    flops_saving = 1 - sum(s.flops for s in stages) / sum(s.full_flops for s in stages)
    time_saving = 1 - used_time / (train_iters * times["full"])
    print(f"FLOPs saving {100 * flops_saving:.1f}% | wall-clock saving {100 * time_saving:.1f}% | "
          f"ratio {time_saving / flops_saving:.2f}" if flops_saving else "no sampled stage")
    return {"flops_saving": flops_saving, "time_saving": time_saving, "stages": rows}


if __name__ == "__main__":
    main()
