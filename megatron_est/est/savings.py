"""FLOPs of a whole EST schedule against the full model, computed without training."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_est.config import ModelConfig
from megatron_est.est.flops import step_flops
from megatron_est.est.sampler import SubnetworkSampler


@dataclass
class StageFlops:
    stage: int  # 1-based, as logged
    first: int  # first iteration (0-based)
    iterations: int
    flops: int
    full_flops: int


def schedule_flops(cfg: ModelConfig, sampler: SubnetworkSampler, train_iters: int,
                   tokens_per_step: int) -> list[StageFlops]:
    """Per-stage training FLOPs of `train_iters` steps, drawing every step's subnetwork as training would."""
    full = step_flops(cfg, tokens_per_step)
    stages: dict[int, StageFlops] = {}
    for it in range(train_iters):
        sub = sampler(it)
        st = stages.setdefault(sub.stage, StageFlops(sub.stage + 1, it, 0, 0, 0))
        st.iterations += 1
        st.flops += step_flops(cfg, tokens_per_step, sub)
        st.full_flops += full
    return list(stages.values())


def saving(stages: list[StageFlops]) -> float:
    return 1.0 - sum(s.flops for s in stages) / sum(s.full_flops for s in stages)
