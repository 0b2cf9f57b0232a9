"""--dry-run: check a plan and print what it costs, without weights, data or a process group.

For --world-size N (default: TP x PP, data-parallel size 1) it validates the layout exactly as training does
(validation.validate), builds every (TP, PP) rank's model on the meta device (planning/params.py), and prints the
parameter counts (total, per rank, embedding and LM head apart), tokens per step, each EST stage's FLOPs per
step (whole model and per pipeline stage, closed form: est/stage_flops.py), the schedule's saving, and the
per-rank memory estimate of every EST stage (planning/memory.py).
"""
from __future__ import annotations


from megatron_est.config import Config, ConfigError
from megatron_est.validation import validate
from megatron_est.est.balance import aligned, balancing_hint, slowdown, what_crosses, worst_shape
from megatron_est.est.build import build_sampler
from megatron_est.est.fit import describe_schedule
from megatron_est.est.sampler import SubnetworkSampler
from megatron_est.est.savings import saving
from megatron_est.est.schedule import Stage
from megatron_est.est.stage_flops import (StageShape, closed_form_flops, pipeline_stage_flops, stage_shape,
                                          step_flops_closed)
from megatron_est.parallel.layout import Layout
from megatron_est.parallel.partition import (balanced_first_last, head_cost_in_layers, stage_layer_ranges,
                                             stage_ranges)
from megatron_est.planning.memory import GiB, MemoryEstimate, engine_plan, estimate
from megatron_est.planning.params import all_rank_params, model_parameters, rank_params


def plan_world_size(cfg: Config) -> int:
    """--world-size, else the smallest world the layout needs (data-parallel size 1)."""
    par = cfg.parallel
    world = par.world_size if par.world_size is not None else \
        par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    if world < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world}")
    return world


def checked_layout(cfg: Config) -> Layout:
    """Validate as training does (ConfigError, one line naming the flag) and return the plan's layout."""
    world = plan_world_size(cfg)
    validate(cfg, world)
    return Layout.of(world, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)


def rank_memory(cfg: Config, world: int, iteration: int = 0, stage: Stage | None = None) -> list[MemoryEstimate]:
    """Memory estimate of the busiest TP rank on every pipeline stage, for the EST stage of `iteration` (or
    `stage`), with the most a step keeps there (est/balance.worst_shape)."""
    tr = cfg.train
    lay = Layout.of(world, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    sampler = build_sampler(cfg)
    shape = worst_shape(cfg, sampler, stage or sampler.schedule.stage_at(iteration))
    e = engine_plan(cfg)
    return [estimate(cfg.model, rank_params(cfg, 0, p), shape, lay.tp, lay.pp, lay.dp, tr.micro_batch_size,
                     lay.micro_batches(tr), e) for p in range(lay.pp)]


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _param_lines(cfg: Config, lay: Layout) -> list[str]:
    ranks = all_rank_params(cfg)
    out = [f"parameters: {model_parameters(ranks):,} in all",
           "| TP rank | PP rank | total | embedding | LM head | layers | final norm |", "|---|---|---|---|---|---|---|"]
    for r in ranks:
        head = f"{r.lm_head:,}" + (" (tied copy)" if r.duplicate else "")
        out.append(f"| {r.tp_rank} | {r.pp_rank} | {r.total:,} | {r.embedding:,} | {head} | {r.layers:,} | "
                   f"{r.final_norm:,} |")
    if cfg.model.tie_embeddings and lay.pp == 1:
        out.append("(the LM head is the tied word embedding)")
    return out


def _stage_lines(cfg: Config, lay: Layout, shapes: list[tuple[int, Stage, StageShape]], tokens: int) -> list[str]:
    full = step_flops_closed(cfg, stage_shape(cfg, build_sampler(cfg), Stage(0, 1.0, 1.0, 1.0)), tokens)
    out = ["| EST stage | rates (pH,pM,pL) | step FLOPs | / full | per pipeline stage (FLOPs) | "
           "memory per GPU by pipeline stage (GiB) | peak phase |", "|---|---|---|---|---|---|---|"]
    for idx, st, shape in shapes:
        flops = step_flops_closed(cfg, shape, tokens)
        per_pp = " / ".join(f"{f:.3e}" for f in pipeline_stage_flops(cfg, shape, tokens))
        mem = rank_memory(cfg, lay.world_size, stage=st)
        mems = " / ".join(_gib(m.peak) + (f" (+{_gib(m.host)} host)" if m.host else "") for m in mem)
        # The whole model keeps a fixed number of layers; only its KV heads (unstratified GQA) can vary.
        mark = "" if shape.exact_kv else " (expected)"
        per_pp += "" if shape.exact else " (expected)"
        out.append(f"| {idx} | {st.p_heads:g},{st.p_mlp:g},{st.p_layers:g} | {flops:.4e}{mark} | "
                   f"{flops / full:.4f} | {per_pp} | {mems} | {max(mem, key=lambda m: m.peak).peak_phase} |")
    return out


def report(cfg: Config) -> list[str]:
    """The dry run's lines (ConfigError before anything is built when the plan is impossible)."""
    resolved = validate(cfg, plan_world_size(cfg))  # a DeepSpeed JSON's ZeRO stage and precision written in
    cfg, lay = resolved.config, resolved.layout
    m, tr = cfg.model, cfg.train
    sampler = build_sampler(cfg)
    tokens = lay.global_batch(tr) * m.seq_length
    e = engine_plan(cfg)
    engine = "plain torch engine" if not e.deepspeed else f"DeepSpeed ZeRO-{e.zero_stage}" + (
        " + optimizer offload" if e.offload_optimizer else "")
    out = [f"dry run: {m.family} {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads "
           f"({m.num_query_groups} KV), vocabulary {m.padded_vocab_size}, seq {m.seq_length}",
           f"layout: world {lay.world_size} = TP {lay.tp} x PP {lay.pp} x DP {lay.dp}; micro-batch "
           f"{tr.micro_batch_size}, global batch {lay.global_batch(tr)} ({lay.micro_batches(tr)} micro-batches per "
           f"rank and step); {engine}, "
           f"{e.precision}, recompute {e.recompute or 'off'}"]
    out += _param_lines(cfg, lay)
    out += _partition_lines(cfg)
    out.append(f"tokens per step: {tokens:,}")
    stages = closed_form_flops(cfg, sampler, tr.train_iters, tokens)
    shapes = [(s.stage, sampler.schedule.stages[s.stage - 1],
               stage_shape(cfg, sampler, sampler.schedule.stages[s.stage - 1])) for s in stages]
    out.append(f"EST schedule {describe_schedule(cfg.est, sampler.schedule)!r} over {tr.train_iters} iterations: "
               + ", ".join(f"stage {s.stage} {s.iterations} it." for s in stages))
    out += _stage_lines(cfg, lay, shapes, tokens)
    out += _balance_lines(cfg, sampler, shapes)
    out.append(f"training FLOPs: {sum(s.flops for s in stages):.4e} vs full model "
               f"{sum(s.full_flops for s in stages):.4e}: {100 * saving(stages):.2f}% saved")
    out.append("memory: per GPU of the busiest TP position, with the most a step keeps there "
               "(est/balance.py); formulas in megatron_est/planning/memory.py")
    return out


def _balance_lines(cfg: Config, sampler: SubnetworkSampler, shapes: list[tuple[int, Stage, StageShape]]) -> list[str]:
    """When the strata cross TP shards or pipeline stages: what that costs each sampled EST stage, and the strata
    that would line up with this layout (est/balance.py)."""
    if aligned(cfg) or all(st.is_full for _, st, _ in shapes):
        return []
    costs = ", ".join(f"stage {idx} x{slowdown(cfg, sampler, st):.3f}" for idx, st, _ in shapes if not st.is_full)
    return [f"balance: {what_crosses(cfg)}; the busiest sets the pace: expected step-time factor {costs} (memory "
            "above is for the most a step keeps)", f"hint: {balancing_hint(cfg)}"]


def _imbalance(sizes: list[int], head: float) -> float:
    """Largest over mean stage cost of the full model (a layer costs 1, the LM head `head`, on the last stage)."""
    costs = sizes[:-1] + [sizes[-1] + head]
    return max(costs) / (sum(costs) / len(costs))


def _partition_lines(cfg: Config) -> list[str]:
    """The pipeline stages' layers and full-model FLOPs balance; with an even split that the LM head unbalances
    by more than 10%, what --pipeline-partition balanced would choose instead."""
    pp = cfg.parallel.pipeline_model_parallel_size
    if pp == 1:
        return []
    ranges, head = stage_ranges(cfg), head_cost_in_layers(cfg.model)
    sizes = [b - a for a, b in ranges]
    out = [f"pipeline stages: layers {' | '.join(f'{a}-{b - 1}' for a, b in ranges)} "
           f"(--pipeline-partition {cfg.parallel.pipeline_partition}); LM head = {head:.2f} layers of FLOPs; "
           f"full-model stage FLOPs max/mean {_imbalance(sizes, head):.2f}"]
    explicit = cfg.parallel.decoder_first_pipeline_num_layers, cfg.parallel.decoder_last_pipeline_num_layers
    if cfg.parallel.pipeline_partition == "even" and explicit == (None, None) and _imbalance(sizes, head) > 1.1:
        n = cfg.model.num_layers
        better = [b - a for a, b in stage_layer_ranges(n, pp, *balanced_first_last(n, pp, head))]
        out.append(f"hint: --pipeline-partition balanced would split the layers {' + '.join(map(str, better))} "
                   f"(max/mean {_imbalance(better, head):.2f})")
    return out


def dry_run(cfg: Config) -> int:
    """Print the report; exit status 0 (a bad plan raises ConfigError: the entry point prints one line)."""
    for line in report(cfg):
        print(line)
    return 0


def main(argv: list[str] | None = None, default_preset: str = "gpt2-tiny") -> int:
    """`python -m megatron_est.planning.dry_run FLAGS`: the training flags, planned instead of run."""
    import sys

    from megatron_est.arguments import parse_args

    try:
        return dry_run(parse_args(argv, "Dry run: check a training plan and print its cost", default_preset))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
