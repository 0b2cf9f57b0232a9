"""Does slicing turn FLOPs into time? Full-model steps against EST stage-1 and stage-2 steps, side by side.

    python bench/bench_est_step.py                       # GPT-2 124M shape, seq 256, micro-batch 4
    python bench/bench_est_step.py --preset gpt2-tiny --reps 10

Each round times one full step and one step per sampled stage (new subnetwork every step), interleaved; the
table reports median time ratios next to the FLOPs ratios (our counting rule, docs/est.md). "step" is
forward + backward + zero-fill + clip + AdamW; "fwd+bwd" leaves out the optimizer.
"""
from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import interleaved_times, median, model_bench_setup  # noqa: E402
from megatron_est.config import TrainConfig  # noqa: E402
from megatron_est.est.flops import step_flops  # noqa: E402
from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges  # noqa: E402
from megatron_est.est.schedule import Schedule, Stage  # noqa: E402
from megatron_est.model.language_model import LanguageModel  # noqa: E402
from megatron_est.parallel.grads import grad_norm_and_clip, zero_fill_missing_grads  # noqa: E402
from megatron_est.training.optimizer import build_optimizer  # noqa: E402

STAGES = {"full": (1.0, 1.0, 1.0), "stage1 (0.5,0.5,0.5)": (0.5, 0.5, 0.5), "stage2 (0.5,0.5,1)": (0.5, 0.5, 1.0)}


def main() -> None:
    args, cfg, tokens = model_bench_setup(__doc__)
    model = LanguageModel(cfg, seed=0)
    opt = build_optimizer(model, TrainConfig())
    params = list(model.parameters())
    strata = Strata(1, 1, even_ranges(cfg.num_layers, 1))
    samplers = {name: SubnetworkSampler(cfg, Schedule((Stage(0, *r),)), 0, strata) for name, r in STAGES.items()}
    counter = {"it": 0}

    def fwd_bwd(name: str) -> None:
        counter["it"] += 1
        plan = model.make_plan(samplers[name](counter["it"]))
        opt.zero_grad(set_to_none=True)
        model(tokens[:, :-1], tokens[:, 1:], plan).mean().backward()

    def step(name: str) -> None:
        fwd_bwd(name)
        zero_fill_missing_grads(params)
        grad_norm_and_clip(params, 1.0, None, 1)
        opt.step()

    variants = {f"{kind}:{n}": (lambda n=n, f=f: f(n)) for n in STAGES for kind, f in (("step", step),
                                                                                       ("fwd+bwd", fwd_bwd))}
    times = interleaved_times(variants, args.reps)
    n_tok = args.micro_batch_size * cfg.seq_length
    full_flops = step_flops(cfg, n_tok)
    print(f"# bench_est_step: preset {args.preset}, seq {cfg.seq_length}, micro-batch {args.micro_batch_size}, "
          f"{sum(p.numel() for p in params) / 1e6:.1f}M params, threads {args.threads}, reps {args.reps}")
    print("| variant | FLOPs ratio | step time ratio | diff | fwd+bwd time ratio | diff | median step s |")
    print("|---|---|---|---|---|---|---|")
    base_step, base_fb = median(times["step:full"]), median(times["fwd+bwd:full"])
    for name in STAGES:
        sub = samplers[name](0)
        fr = step_flops(cfg, n_tok, sub) / full_flops
        tr_step, tr_fb = median(times[f"step:{name}"]) / base_step, median(times[f"fwd+bwd:{name}"]) / base_fb
        print(f"| {name} | {fr:.3f} | {tr_step:.3f} | {tr_step - fr:+.3f} | {tr_fb:.3f} | {tr_fb - fr:+.3f} | "
              f"{median(times[f'step:{name}']):.3f} |")


if __name__ == "__main__":
    main()
