"""Build the per-step sampler from the configuration and the parallel layout."""
from __future__ import annotations

from megatron_est.config import Config
from megatron_est.est.fit import fit_schedule
from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges
from megatron_est.est.schedule import Schedule, parse_schedule


def layer_strata(cfg: Config) -> tuple[tuple[int, int], ...]:
    """--est-pp-strata equal layer ranges. Never the pipeline stages: every layout that shares the flags draws the
    same layers (a range that crosses a stage boundary gives its stages kept counts that vary from step to step;
    est/balance.py says what that costs)."""
    return even_ranges(cfg.model.num_layers, cfg.est.pp_strata)


def strata(cfg: Config) -> Strata:
    return Strata(heads=cfg.est.tp_strata, neurons=cfg.est.tp_strata, layers=layer_strata(cfg))


def build_sampler(cfg: Config) -> SubnetworkSampler:
    m, est = cfg.model, cfg.est
    seed = cfg.train.seed if est.seed is None else est.seed

    def make(schedule: Schedule) -> SubnetworkSampler:
        return SubnetworkSampler(m, schedule, seed, strata(cfg), est.stratified, est.layer_rescale, est.keep_end_layers)

    schedule = parse_schedule(est.schedule, cfg.train.train_iters)
    if est.target_saving is not None:
        schedule = fit_schedule(schedule, make, m, cfg.train.train_iters, est.target_saving)
    return make(schedule)
