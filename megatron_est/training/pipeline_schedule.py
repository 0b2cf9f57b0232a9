"""One optimizer step's forward and backward passes over all micro-batches: the 1F1B pipeline schedule.

Stage r of P runs min(P - r - 1, M) warm-up forwards, then alternates one forward and one backward, then drains
the remaining backwards; at most P - r micro-batches are alive at once, not M. With P = 1 this is plain gradient
accumulation (forward, backward, forward, backward, ...), so one code path serves every layout.

The embedding runs on the first stage, the final norm, head and loss on the last; a stage runs only its kept
layers of the step's subnetwork (the plan) and, when it kept none, hands its input on unchanged.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_est.model.language_model import LanguageModel
from megatron_est.model.plan import ModelPlan
from megatron_est.parallel.p2p import StageP2P
from megatron_est.parallel.state import ParallelState
from megatron_est.training.batches import MicroBatches


@dataclass
class StageTimer:
    """Where one rank's schedule time went (accumulated over calls)."""
    busy_s: float = 0.0  # forward and backward compute (including tensor-parallel collectives), wall clock
    busy_cpu_s: float = 0.0  # the same spans in this thread's CPU time: unaffected by other jobs on the cores
    wall_s: float = 0.0  # the whole schedule: compute plus waiting for the neighbouring stages

    @property
    def bubble_frac(self) -> float:
        return 1.0 - self.busy_s / self.wall_s if self.wall_s > 0 else 0.0


class _StageStep:
    """This stage's share of one step: forward and backward of single micro-batches."""

    def __init__(self, model: LanguageModel, batches: MicroBatches, step: int, plan: Optional[ModelPlan],
                 st: ParallelState, loss_div: int, timer: Optional[StageTimer], precision=None):
        self.model, self.batches, self.step, self.plan, self.st = model, batches, step, plan, st
        self.loss_div, self.timer = loss_div, timer
        self.precision = precision  # training.precision.Precision: autocast and fp16 loss scale, or None
        self.loss_sum = torch.zeros((), device=st.device)
        cfg = model.cfg
        dtype = next(model.parameters()).dtype
        self.p2p = StageP2P(st, (batches.mbs, cfg.seq_length, cfg.hidden_size), dtype)

    def _tokens(self, micro: int) -> Optional[torch.Tensor]:
        if not (self.st.is_first_stage or self.st.is_last_stage):
            return None  # a middle stage needs neither inputs nor labels
        return self.batches.get(self.step, micro).to(self.st.device, non_blocking=True)

    def forward(self, micro: int, x: Optional[torch.Tensor]) -> torch.Tensor:
        """Hidden states to send on, or (last stage) this micro-batch's scaled mean loss."""
        t0 = self._clock()
        tokens = self._tokens(micro)
        inputs = tokens[:, :-1] if self.st.is_first_stage else x
        labels = tokens[:, 1:] if self.st.is_last_stage else None
        if self.precision is None:
            out = self.model(inputs, labels, self.plan)
        else:
            with self.precision.autocast():
                out = self.model(inputs, labels, self.plan)
        if self.st.is_last_stage:
            out = out.mean() / self.loss_div
            self.loss_sum += out.detach()
        self._add_busy(t0)
        return out

    def backward(self, x: Optional[torch.Tensor], y: torch.Tensor,
                 grad_y: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Backpropagate one micro-batch; return the gradient for the previous stage (None on the first)."""
        if y is x:  # every layer of this middle stage was skipped: the identity passes the gradient through
            return grad_y
        t0 = self._clock()
        if grad_y is None and self.precision is not None:
            y = self.precision.scale(y)  # fp16: the loss scale enters here, once, on the last stage
        torch.autograd.backward(y, grad_tensors=grad_y)  # grad_y is None on the last stage: y is the loss
        self._add_busy(t0)
        return None if x is None else x.grad

    def _clock(self) -> tuple[float, float]:
        return (time.perf_counter(), time.thread_time()) if self.timer is not None else (0.0, 0.0)

    def _add_busy(self, t0: tuple[float, float]) -> None:
        if self.timer is not None:
            self.timer.busy_s += time.perf_counter() - t0[0]
            self.timer.busy_cpu_s += time.thread_time() - t0[1]


def forward_backward(model: LanguageModel, batches: MicroBatches, step: int, plan: Optional[ModelPlan],
                     st: ParallelState, timer: Optional[StageTimer] = None, precision=None) -> torch.Tensor:
    """Run step `step` over all micro-batches with 1F1B, accumulating gradients.

    Returns this stage's summed loss (the mean over micro-batches on the last stage, zero on other stages).
    """
    t_start = time.perf_counter()
    n_micro = batches.num_micro
    s = _StageStep(model, batches, step, plan, st, n_micro, timer, precision)
    p2p = s.p2p
    n_warmup = min(st.pp - st.pp_rank - 1, n_micro)
    alive: deque[tuple[Optional[torch.Tensor], torch.Tensor]] = deque()  # (input, output) awaiting backward
    for micro in range(n_warmup):
        x = p2p.recv_forward()
        y = s.forward(micro, x)
        p2p.send_forward(y)
        alive.append((x, y))
    x = p2p.recv_forward() if n_warmup < n_micro else None
    for micro in range(n_warmup, n_micro):
        y = s.forward(micro, x)
        alive.append((x, y))
        grad_y = p2p.send_forward_recv_backward(y)
        dx = s.backward(*alive.popleft(), grad_y)
        if micro == n_micro - 1:
            p2p.send_backward(dx)
        else:
            x = p2p.send_backward_recv_forward(dx)
    for _ in range(n_warmup):
        grad_y = p2p.recv_backward()
        p2p.send_backward(s.backward(*alive.popleft(), grad_y))
    if timer is not None:
        timer.wall_s += time.perf_counter() - t_start
    return s.loss_sum


@torch.no_grad()
def forward_only(model: LanguageModel, batches: MicroBatches, step: int, st: ParallelState,
                 plan: Optional[ModelPlan] = None) -> torch.Tensor:
    """Forward every micro-batch of step `step` through the pipeline (evaluation).

    Returns the sum over micro-batches of the mean loss on the last stage, zero on other stages.
    """
    s = _StageStep(model, batches, step, plan, st, 1, None)
    for micro in range(batches.num_micro):
        s.p2p.send_forward(s.forward(micro, s.p2p.recv_forward()))
    return s.loss_sum
