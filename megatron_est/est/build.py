"""Build the per-step sampler from the configuration and the parallel layout."""
from __future__ import annotations

from megatron_est.config import Config
from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges
from megatron_est.est.schedule import parse_schedule


def build_sampler(cfg: Config) -> SubnetworkSampler:
    m, est, par = cfg.model, cfg.est, cfg.parallel
    strata = Strata(heads=est.tp_strata or par.tensor_model_parallel_size,
                    neurons=est.tp_strata or par.tensor_model_parallel_size,
                    layers=even_ranges(m.num_layers, est.pp_strata or par.pipeline_model_parallel_size))
    schedule = parse_schedule(est.schedule, cfg.train.train_iters)
    seed = cfg.train.seed if est.seed is None else est.seed
    return SubnetworkSampler(m, schedule, seed, strata, est.stratified, est.layer_rescale)
