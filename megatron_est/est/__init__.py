"""Evolving Subnetwork Training: schedule, per-step sampler and FLOPs accounting."""
from megatron_est.est.flops import step_flops
from megatron_est.est.sampler import Strata, Subnetwork, SubnetworkSampler, even_ranges, keep_count
from megatron_est.est.schedule import Schedule, Stage, parse_schedule

__all__ = ["step_flops", "Strata", "Subnetwork", "SubnetworkSampler", "even_ranges", "keep_count", "Schedule",
           "Stage", "parse_schedule"]
