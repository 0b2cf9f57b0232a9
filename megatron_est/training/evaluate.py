"""Validation loss of the full, unscaled model (EST never applies at evaluation)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist

from megatron_est.parallel.state import ParallelState
from megatron_est.training.batches import MicroBatches
from megatron_est.training.pipeline_schedule import forward_only
from megatron_est.training.precision import Precision


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: MicroBatches, eval_iters: int, st: ParallelState,
             precision: Optional[Precision] = None) -> float:
    """precision: the engine's (training/engine.py): a bf16/fp16 plain-engine run evaluates under the autocast it
    trains with, which also lets GPU attention use its half-precision kernels; None (fp32, or DeepSpeed, whose
    module already runs in half precision) evaluates as the module is."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=st.device)
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    with autocast:
        for step in range(eval_iters):  # through the pipeline stages when pp > 1; the loss is on the last one
            total += forward_only(model, batches, step, st).double()
    if st.pp > 1:
        dist.all_reduce(total, group=st.pp_group)
    total /= eval_iters * batches.num_micro
    if st.dp > 1:
        dist.all_reduce(total, group=st.dp_group)
        total /= st.dp
    model.train(was_training)
    return float(total)
