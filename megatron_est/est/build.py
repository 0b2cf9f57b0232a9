"""Build the per-step sampler from the configuration and the parallel layout."""
from __future__ import annotations

from megatron_est.config import Config
from megatron_est.parallel.partition import stage_ranges
from megatron_est.est.fit import fit_schedule
from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges
from megatron_est.est.schedule import Schedule, parse_schedule
from megatron_est.parallel.partition import is_even


def layer_strata(cfg: Config) -> tuple[tuple[int, int], ...]:
    """Layer strata: --est-pp-strata even ranges, or the pipeline stages themselves when they are uneven.

    Either way every stratum lies inside one stage, so stratified sampling keeps each stage's share of layers.
    """
    stages = stage_ranges(cfg)
    if not is_even(stages):
        return stages
    return even_ranges(cfg.model.num_layers, cfg.est.pp_strata or cfg.parallel.pipeline_model_parallel_size)


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
