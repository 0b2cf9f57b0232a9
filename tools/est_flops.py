#!/usr/bin/env python
"""Print the training FLOPs an EST schedule saves against the full model, for any model preset, without training.

    python tools/est_flops.py --model-preset gpt2-124m --est-schedule gpt2-paper
    python tools/est_flops.py --model-preset tinyllama-1.1b --est-schedule "0:0.5,0.5,0.5;3000:0.5,0.5,1;6000:1,1,1" \
        --train-iters 10000 --global-batch-size 1024

Takes the training flags (model, batch, EST, parallel layout with --world-size N) and refuses what training
refuses (validation.validate). Counting rule: docs/est.md. Each stage's step FLOPs come in closed form from the keep
counts training samples with (megatron_est/est/stage_flops.py), so any --train-iters is instant and the figure
equals the run's logged cumulative saving (an expectation only under --no-est-stratified with grouped queries,
where the KV heads used vary from step to step: the table marks such stages).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_est.arguments import parse_args  # noqa: E402
from megatron_est.config import ConfigError  # noqa: E402
from megatron_est.est.build import build_sampler  # noqa: E402
from megatron_est.est.fit import describe_schedule  # noqa: E402
from megatron_est.est.savings import StageFlops, saving  # noqa: E402
from megatron_est.est.schedule import is_smooth  # noqa: E402
from megatron_est.est.stage_flops import closed_form_flops, stage_shape  # noqa: E402
from megatron_est.planning.dry_run import checked_layout  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    try:
        cfg = parse_args(argv, __doc__.splitlines()[0], "gpt2-124m")
        layout = checked_layout(cfg)  # validates as training does, at --world-size
        sampler = build_sampler(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    tr, m = cfg.train, cfg.model
    gbs = layout.global_batch(tr)
    stages = closed_form_flops(cfg, sampler, tr.train_iters, gbs * m.seq_length)
    print(f"model {m.family} {m.num_layers}L h{m.hidden_size} seq {m.seq_length} vocab {m.padded_vocab_size}; "
          f"schedule {describe_schedule(cfg.est, sampler.schedule)!r}; "
          f"{tr.train_iters} iterations of {gbs * m.seq_length} tokens")
    print("| stage | iterations | first | rates (pH,pM,pL) | step FLOPs / full |")
    print("|---|---|---|---|---|")
    smooth = is_smooth(cfg.est.schedule)
    for group in (_runs_of_equal_shape(cfg, sampler, stages) if smooth else [[st] for st in stages]):
        print(_row(cfg, sampler, group))
    total = saving(stages)
    print(f"training FLOPs: {sum(s.flops for s in stages):.4e} vs full model "
          f"{sum(s.full_flops for s in stages):.4e}: {100 * total:.2f}% saved")
    return total


def _runs_of_equal_shape(cfg, sampler, stages: list[StageFlops]) -> list[list[StageFlops]]:
    """A smooth schedule's one-iteration stages, grouped where neighbours keep the same heads and layers (one row
    each; the MLP neurons kept may still grow inside a row)."""
    def shape(st: StageFlops):
        s = stage_shape(cfg, sampler, sampler.schedule.stages[st.stage - 1])
        return s.n_q, s.layers

    runs: list[list[StageFlops]] = []
    for st in stages:
        if runs and shape(runs[-1][-1]) == shape(st):
            runs[-1].append(st)
        else:
            runs.append([st])
    return runs


def _row(cfg, sampler, group: list[StageFlops]) -> str:
    first, last = group[0], group[-1]
    rates = [sampler.schedule.stages[st.stage - 1] for st in (first, last)]
    text = [f"{r.p_heads:g},{r.p_mlp:g},{r.p_layers:g}" for r in rates]
    exact = all(stage_shape(cfg, sampler, sampler.schedule.stages[st.stage - 1]).exact_kv for st in group)
    mark = "" if exact else " (expected: KV heads used vary per step)"
    label = str(first.stage) if first is last else f"{first.stage}-{last.stage}"
    rate_text = text[0] if first is last else f"{text[0]} to {text[1]}"
    return (f"| {label} | {sum(st.iterations for st in group)} | {first.first} | {rate_text} | "
            f"{sum(st.flops for st in group) / sum(st.full_flops for st in group):.4f}{mark}"
            f"{' (mean)' if first is not last else ''} |")


if __name__ == "__main__":
    main()
