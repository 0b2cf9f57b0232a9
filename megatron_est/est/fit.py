"""--est-target-saving: scale a schedule's stage boundaries by one factor f to hit a training-FLOPs saving.

Every stage start s becomes round(s * f), clamped to --train-iters; stages left empty are dropped. The saving is
counted with the same rule as the training log (est/flops.py), for this model, sequence length and --train-iters.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from megatron_est.config import ConfigError, ESTConfig, ModelConfig
from megatron_est.est.flops import step_flops
from megatron_est.est.sampler import SubnetworkSampler, keep_count
from megatron_est.est.schedule import Schedule, Stage, is_smooth

FLAG = "--est-target-saving"
TOLERANCE = 0.005  # half a percentage point
_DRAWS = 8  # draws per stage: one suffices when keep counts fix the FLOPs; unstratified GQA varies the KV heads


def check_target(target: float, schedule: Schedule) -> None:
    """The refusals that need no FLOPs counting (validation.validate calls this before any data is read)."""
    if not 0.0 < target < 1.0:
        raise ConfigError(f"{FLAG} must lie in (0, 1), got {target:g}")
    if not schedule.enabled:
        raise ConfigError(f"{FLAG} needs an --est-schedule with a sub-full stage (the schedule has none)")


def scaled_starts(schedule: Schedule, f: float, train_iters: int) -> list[int]:
    # Half up, as keep_count rounds; monotone in f, so the starts stay non-decreasing.
    return [0] + [min(train_iters, int(st.start * f + 0.5)) for st in schedule.stages[1:]]


def scale_schedule(schedule: Schedule, f: float, train_iters: int) -> Schedule:
    starts = scaled_starts(schedule, f, train_iters)
    spans = zip(schedule.stages, starts, starts[1:] + [train_iters])
    return Schedule(tuple(dataclasses.replace(st, start=a) for st, a, b in spans if b > a))


def stage_ratios(schedule: Schedule, make_sampler: Callable[[Schedule], SubnetworkSampler],
                 model: ModelConfig) -> list[float]:
    """Step FLOPs / full-model step FLOPs of each stage, from subnetworks drawn as training draws them."""
    full = step_flops(model, 1)
    sampler = make_sampler(schedule)  # for its sampling ranges, which do not depend on the schedule
    cache: dict[tuple, float] = {}
    ratios = []
    for st in schedule.stages:
        key = _draw_key(sampler, st)
        if key not in cache:
            draw = make_sampler(Schedule((dataclasses.replace(st, start=0),)))  # this stage at every iteration
            cache[key] = sum(step_flops(model, 1, draw(i)) for i in range(_DRAWS)) / (_DRAWS * full)
        ratios.append(cache[key])
    return ratios


def _draw_key(sampler: SubnetworkSampler, st: Stage) -> tuple:
    """What a stage's draws depend on: the keep count of every sampling range (or None: not sampled). Stages
    with equal keys draw identical subnetworks at every iteration (a smooth schedule's neighbouring stages)."""
    def counts(ranges: list[tuple[int, int]], p: float):
        return None if p >= 1.0 else tuple(keep_count(p, end - start) for start, end in ranges)
    return (counts(sampler.head_ranges(), st.p_heads), counts(sampler.neuron_ranges(), st.p_mlp),
            counts(sampler.layer_ranges(), st.p_layers))


def _saving(schedule: Schedule, ratios: list[float], f: float, train_iters: int) -> float:
    starts = scaled_starts(schedule, f, train_iters)
    used = sum(r * (b - a) for r, a, b in zip(ratios, starts, starts[1:] + [train_iters]))
    return 1.0 - used / train_iters


def _bisect(saving_at: Callable[[float], float], target: float, lo: float, hi: float) -> float:
    """lo and hi lie on opposite sides of target; narrow them to neighbouring steps, return the closer one."""
    lo_below = saving_at(lo) < target
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if (saving_at(mid) < target) == lo_below:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda f: abs(saving_at(f) - target))


def fit_schedule(schedule: Schedule, make_sampler: Callable[[Schedule], SubnetworkSampler], model: ModelConfig,
                 train_iters: int, target: float) -> Schedule:
    check_target(target, schedule)
    ratios = stage_ratios(schedule, make_sampler, model)
    # Beyond f_max the first stage covers every iteration; at f = 0 the last one does.
    f_max = (train_iters + 1) / schedule.stages[1].start if len(schedule.stages) > 1 else 1.0

    def saving_at(f: float) -> float:
        return _saving(schedule, ratios, f, train_iters)

    ends = sorted((saving_at(0.0), saving_at(f_max)))
    if not ends[0] - TOLERANCE <= target <= ends[1] + TOLERANCE:
        raise ConfigError(f"{FLAG} {target:g} is unreachable with this --est-schedule and model: scaling its stage "
                          f"boundaries saves {100 * ends[0]:.1f}% to at most {100 * ends[1]:.1f}%")
    if ends[0] <= target <= ends[1]:
        f = _bisect(saving_at, target, 0.0, f_max)
    else:  # just outside the range, within the tolerance: the nearer end
        f = min((0.0, f_max), key=lambda x: abs(saving_at(x) - target))
    got = saving_at(f)
    if abs(got - target) > TOLERANCE:
        raise ConfigError(f"{FLAG} {target:g}: the nearest saving whole-iteration boundaries give is "
                          f"{100 * got:.2f}%; raise --train-iters")
    return scale_schedule(schedule, f, train_iters)


def format_schedule(schedule: Schedule) -> str:
    """A spec that --est-schedule accepts and that reproduces this schedule."""
    return ";".join(f"{st.start}:{st.p_heads:g},{st.p_mlp:g},{st.p_layers:g}" for st in schedule.stages)


def describe_schedule(est: ESTConfig, schedule: Schedule) -> str:
    """Log text: the spec as given, and the resolved stage starts when --est-target-saving moved them."""
    if est.target_saving is None:
        return est.schedule
    if is_smooth(est.schedule):  # thousands of one-iteration stages: where the ramp now ends
        return (f"{est.schedule} scaled for {FLAG} {est.target_saving:g}: {len(schedule.stages)} stages, the last "
                f"starting at iteration {schedule.stages[-1].start}")
    return f"{est.schedule} scaled for {FLAG} {est.target_saving:g}: {format_schedule(schedule)}"
