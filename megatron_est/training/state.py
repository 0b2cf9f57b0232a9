"""Where a run stands: what the loop advances, the checkpoint restores and the entry point reports."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    iteration: int = 0  # completed optimizer steps
    cumulative_flops: int = 0
    full_cumulative_flops: int = 0
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient norm (engine.StepResult.nonfinite)
    history: list = field(default_factory=list)  # every record written, for callers and tests
