"""Does slicing turn FLOPs into time? Full-model steps against EST stage-1 and stage-2 steps, side by side, for
the new step path and the old one.

    OMP_NUM_THREADS=1 python bench/bench_est_step.py --micro-batch-size 4     # GPT-2 124M shape, seq 256
    python bench/bench_est_step.py --preset gpt2-tiny --reps 10 --paths new
    OMP_NUM_THREADS=1 python bench/bench_est_step.py --micro-batch-size 4 --micro-batches 4 --paths new
    OMP_NUM_THREADS=1 python bench/bench_est_step.py --micro-batch-size 2 --paths new --processes 3

A step is what the plain engine does (training/engine.py): zero_grad, forward + backward on a new subnetwork
(over --micro-batches accumulated micro-batches, 1 by default), clipping, the unsampled policy's gradient
completion, the policy's optimizer step (--unsampled-update, the training default unless given).
Paths: "new" = sliced gradients added straight into .grad (parallel/sliced_grad.py), torch's fused AdamW, freeze
stepping sliced weights on their kept slices (est/unsampled.py Narrowed); "old" = autograd's full-size sliced
gradients, the multi-tensor (foreach) AdamW, freeze stepping whole tensors and writing the frozen elements back.
Each round times one step of every (path, stage), interleaved; the table reports median time ratios to the same
path's full-model step next to the FLOPs ratio (our counting rule, docs/est.md), and "saving" = (1 - step ratio) /
(1 - FLOPs ratio): the share of the FLOPs saving that became time. Two clocks: wall time, and this process's CPU
time (time.process_time: with one thread it hardly moves when other jobs share the cores, where wall time does;
it does not see memory-bandwidth contention), and each step's minor page faults beside them. "floor" is the step
ratio slicing could reach at best: forward + backward at exactly the FLOPs ratio of the full model's, the rest of
the step (gradient completion, clipping, the optimizer, which adamw runs over every parameter) as measured.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from bench.common import in_fresh_processes, median, model_bench_setup, spread  # noqa: E402
from megatron_est.config import ESTConfig, TrainConfig  # noqa: E402
from megatron_est.est.flops import step_flops  # noqa: E402
from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges  # noqa: E402
from megatron_est.est.schedule import Schedule, Stage  # noqa: E402
from megatron_est.est.unsampled import AdamWUpdate, FreezeUpdate  # noqa: E402
from megatron_est.host_memory import keep_freed_memory  # noqa: E402
from megatron_est.model.language_model import LanguageModel  # noqa: E402
from megatron_est.parallel.grads import grad_norm_and_clip  # noqa: E402
from megatron_est.parallel.sliced_grad import set_direct_grads  # noqa: E402
from megatron_est.training.optimizer import build_optimizer, param_groups  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time,
          "faults": lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt}  # minor page faults, a count
TIMERS = ("wall", "cpu")
STAGES = {"full": (1.0, 1.0, 1.0), "stage1 (0.5,0.5,0.5)": (0.5, 0.5, 0.5), "stage2 (0.5,0.5,1)": (0.5, 0.5, 1.0)}


def _paths(model: LanguageModel, tr: TrainConfig, mode: str, names: list[str]) -> dict:
    """(optimizer, policy, direct gradients) per path; each path has its own optimizer state."""
    out = {}
    for name in names:
        new = name == "new"
        opt = build_optimizer(model, tr) if new else torch.optim.AdamW(
            param_groups(model, tr), lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps,
            foreach=True)
        policy = FreezeUpdate(narrow=new) if mode == "freeze" else AdamWUpdate()
        out[name] = (opt, policy, new)
    return out


def _own_flags() -> argparse.Namespace:
    """This benchmark's flags; the shared ones (bench/common.py) are parsed from what is left."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--unsampled-update", default=ESTConfig().unsampled_update, choices=("freeze", "adamw"),
                    help="the policy timed (default: the training default)")
    ap.add_argument("--paths", default="new,old", help="comma-separated: new, old")
    ap.add_argument("--micro-batches", type=int, default=1,
                    help="micro-batches accumulated per optimizer step (one subnetwork for all of them)")
    ap.add_argument("--processes", type=int, default=1,
                    help="run the whole benchmark in this many fresh processes, one after another, and report "
                         "the median over them with the range (a process's memory placement moves its ratios)")
    ap.add_argument("--no-keep-host-memory", dest="keep_host_memory", action="store_false",
                    help="glibc's malloc defaults, as --no-keep-host-memory in training")
    ap.add_argument("--json-out", help="also write the rows as JSON here (used by --processes)")
    own, rest = ap.parse_known_args()
    own.rest = rest
    sys.argv = [sys.argv[0], *rest]
    return own


def _over_processes(own: argparse.Namespace) -> None:
    """Run this benchmark in own.processes fresh processes; print the median ratio rows with their ranges."""
    runs = in_fresh_processes(__file__, [*own.rest, "--unsampled-update", own.unsampled_update, "--paths", own.paths,
                                         "--micro-batches", str(own.micro_batches),
                                         *([] if own.keep_host_memory else ["--no-keep-host-memory"])],
                              own.processes)
    print(f"# median over {own.processes} processes (min..max of the diff and the saving)")
    print("| clock | path | variant | FLOPs ratio | step time ratio | diff (range) | saving (range) | "
          "fwd+bwd ratio | diff (range) | floor | floor saving |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k, row in enumerate(runs[0]):
        rs = [run[k] for run in runs]
        fr, step, fb = row["flops"], [r["step"] for r in rs], [r["fwd+bwd"] for r in rs]
        sav = [(1 - x) / (1 - fr) for x in step] if fr < 1 else None
        saving = spread(sav) if sav else "-"
        floor = median([r["floor"] for r in rs])
        floor_saving = f"{(1 - floor) / (1 - fr):.3f}" if fr < 1 else "-"
        print(f"| {row['clock']} | {row['path']} | {row['variant']} | {fr:.3f} | {median(step):.3f} | "
              f"{median(step) - fr:+.3f} ({min(step) - fr:+.3f}..{max(step) - fr:+.3f}) | {saving} | "
              f"{median(fb):.3f} | {median(fb) - fr:+.3f} ({min(fb) - fr:+.3f}..{max(fb) - fr:+.3f}) | "
              f"{floor:.3f} | {floor_saving} |")


def main() -> None:
    own = _own_flags()
    if own.processes > 1:
        return _over_processes(own)
    host = keep_freed_memory(own.keep_host_memory, "cpu")  # what a CPU training run does (host_memory.py)
    args, cfg, tokens = model_bench_setup(__doc__)
    args.unsampled_update, args.paths, n_micro = own.unsampled_update, own.paths, own.micro_batches
    # one distinct micro-batch per accumulation step; the first is model_bench_setup's
    tokens = torch.cat([tokens] + [torch.randint(0, cfg.vocab_size, tokens.shape,
                                                 generator=torch.Generator().manual_seed(i))
                                   for i in range(1, n_micro)])
    model = LanguageModel(cfg, seed=0)
    params = list(model.parameters())
    paths = _paths(model, TrainConfig(), args.unsampled_update, args.paths.split(","))
    strata = Strata(1, 1, even_ranges(cfg.num_layers, 1))
    samplers = {name: SubnetworkSampler(cfg, Schedule((Stage(0, *r),)), 0, strata) for name, r in STAGES.items()}
    counter = {"it": 0}
    times = {(clock, p, s): {"step": [], "fwd+bwd": []} for clock in CLOCKS for p in paths for s in STAGES}

    def step(path: str, stage: str) -> dict:
        opt, policy, direct = paths[path]
        set_direct_grads(model, direct)
        counter["it"] += 1
        t0 = {c: f() for c, f in CLOCKS.items()}
        plan = model.make_plan(samplers[stage](counter["it"]))
        opt.zero_grad(set_to_none=True)
        for mb in tokens.split(args.micro_batch_size):
            (model(mb[:, :-1], mb[:, 1:], plan).mean() / n_micro).backward()
        t1 = {c: f() for c, f in CLOCKS.items()}
        grad_norm_and_clip(params, 1.0, None, 1)
        policy.complete_grads(params)  # after clipping, as training/engine.py does
        policy.step(opt, model, plan)
        return {c: (f() - t0[c], t1[c] - t0[c]) for c, f in CLOCKS.items()}

    load_start = os.getloadavg()
    for rnd in range(args.reps + 1):  # round 0 warms up (and creates every optimizer's state)
        for path in paths:
            for stage in STAGES:
                for clock, (total, fb) in step(path, stage).items():
                    if rnd:
                        times[(clock, path, stage)]["step"].append(total)
                        times[(clock, path, stage)]["fwd+bwd"].append(fb)
    load_end = os.getloadavg()
    n_tok = args.micro_batch_size * n_micro * cfg.seq_length
    full_flops = step_flops(cfg, n_tok)
    print(f"# bench_est_step: preset {args.preset}, seq {cfg.seq_length}, micro-batch {args.micro_batch_size}, "
          f"x {n_micro} accumulated, {sum(p.numel() for p in params) / 1e6:.1f}M params, threads {args.threads}, "
          f"reps {args.reps}, "
          f"--unsampled-update {args.unsampled_update}; load average (1, 5, 15 min) at start "
          f"{', '.join(f'{x:.1f}' for x in load_start)}, at end {', '.join(f'{x:.1f}' for x in load_end)}")
    print(f"# host memory: {host}")
    print("| clock | path | variant | FLOPs ratio | step time ratio | diff | saving | fwd+bwd time ratio | diff | "
          "floor | median step s | median optimizer s | page faults per step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for clock in TIMERS:
        for path in paths:
            base = {k: median(v) for k, v in times[(clock, path, "full")].items()}
            for stage in STAGES:
                fr = step_flops(cfg, n_tok, samplers[stage](0)) / full_flops
                t = times[(clock, path, stage)]
                r_step, r_fb = median(t["step"]) / base["step"], median(t["fwd+bwd"]) / base["fwd+bwd"]
                saving = f"{(1 - r_step) / (1 - fr):.3f}" if fr < 1 else "-"
                opt_s = median([a - b for a, b in zip(t["step"], t["fwd+bwd"])])
                # the step ratio if forward + backward took exactly the FLOPs ratio of the full model's and the
                # rest (gradient completion, clipping, optimizer) what it measured: what slicing could reach
                floor = (fr * base["fwd+bwd"] + opt_s) / base["step"]
                faults = median(times[("faults", path, stage)]["step"])
                print(f"| {clock} | {path} | {stage} | {fr:.3f} | {r_step:.3f} | {r_step - fr:+.3f} | {saving} | "
                      f"{r_fb:.3f} | {r_fb - fr:+.3f} | {floor:.3f} | {median(t['step']):.3f} | {opt_s:.3f} | "
                      f"{faults:.0f} |")
                rows.append({"clock": clock, "path": path, "variant": stage, "flops": fr, "step": r_step,
                             "fwd+bwd": r_fb, "floor": floor})
    if own.json_out:
        with open(own.json_out, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
