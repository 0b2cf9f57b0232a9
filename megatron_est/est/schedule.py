"""The staged EST schedule: which sampling rates (p_H, p_M, p_L) apply at each iteration."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from megatron_est.config import ConfigError


@dataclass(frozen=True)
class Stage:
    start: int  # first iteration (0-based count of completed steps) that uses these rates
    p_heads: float
    p_mlp: float
    p_layers: float

    @property
    def is_full(self) -> bool:
        return self.p_heads == 1.0 and self.p_mlp == 1.0 and self.p_layers == 1.0


# Named schedules, as spec strings over a fraction of training written with "%": "0%" is the first iteration,
# "25%" the first iteration after a quarter of train_iters. Resolved against --train-iters.
SCHEDULE_PRESETS: dict[str, str] = {
    # Stage 1 samples all three dimensions, stage 2 keeps every layer, stage 3 is the full model.
    # About 25% fewer layer FLOPs than the full model at equal iterations (0.2*0.25 + 0.2*0.5 + 0.6*1 = 0.75).
    "default": "0%:0.5,0.5,0.5;20%:0.5,0.5,1;40%:1,1,1",
    # The paper's headline savings under our FLOPs counting rule (docs/est.md), at the model's preset sequence
    # length and an equal number of iterations: stages 1 and 2 of equal length x, solved for x
    # (tools/est_flops.py prints the saving of any schedule for any preset).
    "gpt2-paper": "0%:0.5,0.5,0.5;29.3%:0.5,0.5,1;58.6%:1,1,1",  # 26.7% for gpt2-124m at seq 1024
    "tinyllama-paper": "0%:0.5,0.5,0.5;21.4%:0.5,0.5,1;42.8%:1,1,1",  # 25.0% for tinyllama-1.1b at seq 2048
}


@dataclass(frozen=True)
class Schedule:
    stages: tuple[Stage, ...]
    # Stage starts, for bisect: a smooth schedule has one stage per iteration (thousands), and every rank looks
    # its stage up every step.
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_starts", tuple(st.start for st in self.stages))

    def stage_index(self, iteration: int) -> int:
        """The last stage whose start is <= iteration (stage 0 before every start)."""
        return max(0, bisect.bisect_right(self._starts, iteration) - 1)

    def stage_at(self, iteration: int) -> Stage:
        return self.stages[self.stage_index(iteration)]

    @property
    def enabled(self) -> bool:
        return any(not st.is_full for st in self.stages)


FULL = Schedule((Stage(0, 1.0, 1.0, 1.0),))


def _parse_start(text: str, train_iters: int) -> int:
    if text.endswith("%"):
        pct = float(text[:-1])
        if not 0.0 <= pct <= 100.0:  # nan and inf too
            raise ConfigError(f"--est-schedule: stage start {text} must be in [0%, 100%] of --train-iters")
        return int(round(pct / 100.0 * train_iters))
    return int(text)


def _shortest_run(spec: str) -> int:
    """The fewest iterations on which a schedule written in percentages keeps its stages apart."""
    n = 1
    while n < 10 ** 6:
        starts = [_parse_start(p.split(":")[0].strip(), n) for p in spec.split(";") if p.strip()]
        if all(b > a for a, b in zip(starts, starts[1:])):
            break
        n += 1
    return n


SMOOTH = "smooth:"


def is_smooth(spec: str) -> bool:
    """A 'smooth:...' --est-schedule (rates interpolated every iteration: smooth_schedule)."""
    return spec.strip().startswith(SMOOTH)


def parse_schedule(spec: str, train_iters: int) -> Schedule:
    """Parse a preset name, "none", "START:pH,pM,pL;..." (START an iteration or a percentage), or
    "smooth:START:pH,pM,pL;..." (the same points, rates interpolated linearly between them: smooth_schedule)."""
    flag = "--est-schedule"
    spec = spec.strip()
    if spec in ("none", ""):
        return FULL
    if is_smooth(spec):
        return smooth_schedule(_parse_stages(spec[len(SMOOTH):], train_iters), train_iters)
    preset, spec = (spec if spec in SCHEDULE_PRESETS else None), SCHEDULE_PRESETS.get(spec, spec)
    if ":" not in spec:
        raise ConfigError(f"{flag}: unknown preset {spec!r} (known: none, {', '.join(SCHEDULE_PRESETS)}; "
                          "or a spec 'START:pH,pM,pL;...')")
    stages = _parse_stages(spec, train_iters, preset)
    return Schedule(tuple(stages))


def _parse_stages(spec: str, train_iters: int, preset: str | None = None) -> list[Stage]:
    flag = "--est-schedule"
    stages = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        try:
            start_s, rates_s = part.split(":")
            rates = [float(r) for r in rates_s.split(",")]
            start = _parse_start(start_s.strip(), train_iters)
        except ConfigError:
            raise
        except ValueError:
            raise ConfigError(f"{flag}: cannot parse stage {part!r} (expected START:pH,pM,pL)") from None
        if len(rates) != 3:
            raise ConfigError(f"{flag}: stage {part!r} needs three rates pH,pM,pL")
        if not all(0.0 < r <= 1.0 for r in rates):
            raise ConfigError(f"{flag}: rates must lie in (0, 1], got {rates_s!r}")
        stages.append(Stage(start, *rates))
    starts = [s.start for s in stages]
    if starts[0] != 0:
        raise ConfigError(f"{flag}: the first stage must start at iteration 0, got {starts[0]}")
    if preset and any(b <= a for a, b in zip(starts, starts[1:])):  # the user wrote neither the spec nor its starts
        raise ConfigError(f"--train-iters {train_iters} is too short for the {preset!r} EST schedule (its stages "
                          f"would start at iterations {starts}): train at least {_shortest_run(spec)} iterations")
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ConfigError(f"{flag}: stage starts must increase strictly, got {starts}")
    return stages


def _rates(st: Stage) -> tuple[float, float, float]:
    return st.p_heads, st.p_mlp, st.p_layers


def _interpolated(a: Stage, b: Stage, iteration: int) -> tuple[float, float, float]:
    t = (iteration - a.start) / (b.start - a.start)
    # Rounded so that a rate meant to be exactly k/n (a keep-count boundary) is not 1e-17 below it.
    return tuple(round(x + (y - x) * t, 12) for x, y in zip(_rates(a), _rates(b)))


def smooth_schedule(points: list[Stage], train_iters: int) -> Schedule:
    """Rates that change every iteration: at iteration i between points a and b, each rate is
    a + (b - a) * (i - a.start) / (b.start - a.start); from the last point on, its rates. Expanded into one
    ordinary Stage per iteration where the rates change, so the sampler, the FLOPs count and the fit need
    nothing new (a run of 14,400 iterations has at most 14,400 stages)."""
    stages: list[Stage] = []

    def add(start: int, rates: tuple[float, float, float]) -> None:
        if not stages or _rates(stages[-1]) != rates:
            stages.append(Stage(start, *rates))

    for a, b in zip(points, points[1:]):
        for i in range(a.start, min(b.start, train_iters)):
            add(i, _interpolated(a, b, i))
    if points[-1].start < train_iters or not stages:
        add(points[-1].start, _rates(points[-1]))
    return Schedule(tuple(stages))
