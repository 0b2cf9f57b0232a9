"""Build the per-step sampler from the configuration and the parallel layout."""
from __future__ import annotations

from megatron_est.config import Config
from megatron_est.parallel.partition import stage_ranges
from megatron_est.est.fit import fit_schedule
from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges
from megatron_est.est.schedule import Schedule, parse_schedule


def layer_strata(cfg: Config) -> tuple[tuple[int, int], ...]:
    """Layer strata: by default the pipeline stages themselves (even or not), so stratified sampling keeps every
    stage's share of its layers and the stages stay balanced; with --est-pp-strata N, N equal ranges wherever the
    stage boundaries fall, so every layout that shares the flag draws the same layers (a stratum that crosses a
    boundary gives its stages kept counts that vary from step to step)."""
    if cfg.est.pp_strata is None:
        return stage_ranges(cfg)
    return even_ranges(cfg.model.num_layers, cfg.est.pp_strata)


def build_sampler(cfg: Config) -> SubnetworkSampler:
    m, est, par = cfg.model, cfg.est, cfg.parallel
    strata = Strata(heads=est.tp_strata or par.tensor_model_parallel_size,
                    neurons=est.tp_strata or par.tensor_model_parallel_size, layers=layer_strata(cfg))
    seed = cfg.train.seed if est.seed is None else est.seed

    def make(schedule: Schedule) -> SubnetworkSampler:
        return SubnetworkSampler(m, schedule, seed, strata, est.stratified, est.layer_rescale, est.keep_end_layers)

    schedule = parse_schedule(est.schedule, cfg.train.train_iters)
    if est.target_saving is not None:
        schedule = fit_schedule(schedule, make, m, cfg.train.train_iters, est.target_saving)
    return make(schedule)
