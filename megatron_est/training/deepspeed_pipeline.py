"""ZeRO-1 with pipeline parallelism: one DeepSpeed engine per pipeline stage, driven by our 1F1B schedule.

DeepSpeed's own pipeline engine needs a PipelineModule and its own schedule; EST needs stages that skip layers
(and whole stages) step by step. So each stage's module is wrapped in an ordinary DeepSpeed engine (ZeRO-1 over
the stage's data-parallel group), and training.pipeline_schedule's 1F1B schedule runs the forward passes
through the engine and the backward passes as plain `tensor.backward(grad)` calls, which DeepSpeed 0.19
supports for ZeRO optimizers (torch-style backward). DeepSpeed runs with unmanaged gradient accumulation and an
accumulation of 1 over the stage's whole share of the global batch: the schedule divides each micro-batch's
loss by the number of micro-batches itself, gradients accumulate locally, and engine.step() reduces them over
data parallelism, clips with the norm summed over tensor and pipeline ranks, and steps once per global batch.

As in Megatron-DeepSpeed, only ZeRO-1 is accepted with pipeline parallelism (config checks refuse 0, 2 and 3:
stage 2/3 partition gradients during backward, which interleaved 1F1B micro-batches would break, and stage 0
does not support tensor-level backward in DeepSpeed).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_est.parallel.grads import sync_tied_embedding_grads
from megatron_est.parallel.state import ParallelState


def adapt_config(conf: dict, num_micro: int) -> dict:
    """The DeepSpeed config a pipeline stage's engine runs with (see the module docstring)."""
    conf = dict(conf)
    conf["train_micro_batch_size_per_gpu"] = conf["train_micro_batch_size_per_gpu"] * num_micro
    conf["gradient_accumulation_steps"] = 1
    conf["managed_gradient_accumulation"] = False
    return conf


def mark_params_for_norm(model: torch.nn.Module, st: ParallelState) -> None:
    """DeepSpeed's markers for its global gradient norm (summed over the model-parallel group, TP x PP):
    tensor-parallel shards count on every TP rank, replicated parameters on TP rank 0 of each stage, and the
    last stage's copy of a tied embedding not at all (DeepSpeed's `ds_pipe_replicated`)."""
    for p in model.parameters():
        if getattr(p, "tensor_parallel", False):
            p.tensor_model_parallel = True
        if getattr(p, "pipeline_duplicate", False):
            p.ds_pipe_replicated = True


class _LossScale:
    """fp16 under DeepSpeed: the last stage multiplies its loss by DeepSpeed's current loss scale (what
    engine.backward would do); the module already runs in half precision, so no autocast."""

    def __init__(self, engine):
        self.engine = engine

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        opt = self.engine.optimizer
        scale = getattr(opt, "loss_scale", None) or getattr(getattr(opt, "loss_scaler", None), "cur_scale", 1.0)
        return loss * float(scale)


def pipelined_step(run, batches, step: int, plan, st: ParallelState, timer=None) -> torch.Tensor:
    """1F1B over the stage engines, tied-embedding sync, stale-gradient fix, one engine.step()."""
    from megatron_est.training.deepspeed_engine import skipped_layer_params, zero_stale_gradients
    from megatron_est.training.pipeline_schedule import forward_backward

    engine = run.engine
    precision: Optional[_LossScale] = _LossScale(engine) if engine.fp16_enabled() else None
    loss_sum = forward_backward(engine, batches, step, plan, st, timer, precision)
    params = [p for p in engine.module.parameters() if p.requires_grad]
    sync_tied_embedding_grads(params, st.embd_group)
    zero_stale_gradients(run, skipped_layer_params(engine.module, run.current_sub))
    engine.step()
    dist.all_reduce(loss_sum, group=st.pp_group)  # only the last stage computed a loss
    return loss_sum
