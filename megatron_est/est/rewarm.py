"""--est-lr-rewarm-iters: a linear learning-rate re-warm after each EST stage switch.

A stage switch puts weights that trained little (or were frozen) back into every step at once; a short ramp lets
the optimizer's moments adapt before the full step size returns. For N > 0 the step that trains iteration i,
k = i - (its stage's first iteration) iterations after a switch, gets the schedule's learning rate times

    (k + 1) / (N + 1)   while k < N,   else 1,

so 1/(N+1) of it at the switch itself and exactly the schedule's value from N iterations after it. The first stage
is no switch (training/optimizer.learning_rate's warmup covers it). Both engines take the factor from here through
training/optimizer.step_lr.
"""
from __future__ import annotations


def rewarm_factor(rewarm_iters: int, stage: int, stage_start: int, iteration: int) -> float:
    since = iteration - stage_start
    if rewarm_iters <= 0 or stage == 0 or since >= rewarm_iters:
        return 1.0
    return (since + 1) / (rewarm_iters + 1)
