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

import contextlib

import torch
import torch.distributed as dist

from megatron_est.parallel.grads import sync_tied_embedding_grads
from megatron_est.parallel.state import ParallelState
from megatron_est.training.deepspeed_unsampled import frozen_during_step, zero_stale_gradients
from megatron_est.training.pipeline_schedule import forward_backward


def adapt_config(conf: dict, num_micro: int, log=None) -> dict:
    """The DeepSpeed config a pipeline stage's engine runs with (see the module docstring).

    zero_optimization.overlap_comm is turned off (with one log line): it overlaps the reduction with the
    backward pass, which needs DeepSpeed to own the accumulation boundary; our stages leave it unmanaged, and
    DeepSpeed refuses the pair ("supports ZeRO overlap_comm only with ZeRO stage 2"). Gradients are reduced
    once per step in engine.step() instead, so the knob has nothing to overlap here; the result is the same.
    """
    conf = dict(conf)
    conf["train_micro_batch_size_per_gpu"] = conf["train_micro_batch_size_per_gpu"] * num_micro
    conf["gradient_accumulation_steps"] = 1
    conf["managed_gradient_accumulation"] = False
    zero = dict(conf.get("zero_optimization") or {})
    if zero.get("overlap_comm"):
        zero["overlap_comm"] = False
        if log is not None:
            log.print("> DeepSpeed with pipeline parallelism: zero_optimization.overlap_comm turned off (our "
                      "1F1B stages reduce gradients once per step, in engine.step(); nothing to overlap)")
    conf["zero_optimization"] = zero
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
    """DeepSpeed's loss scale in our 1F1B schedule (the precision object training.pipeline_schedule expects).

    DeepSpeed 0.19 unscales every stage's gradients by that stage's optimizer loss scale in engine.step(), and,
    when the scale is dynamic (fp16), raises in its post-backward hook unless the backward was certified as
    scaled by engine.scale(). So:
    - the last stage scales its loss with engine.scale(loss) (a factor 1 under bf16/fp32);
    - every other stage backpropagates a received gradient that already carries the last stage's scale, which
      is its own: all stages' scalers start equal and move together, because engine.step() agrees on overflow
      over the data-parallel and the TP x PP group. Such a backward is certified by the flag engine.scale()
      sets (DeepSpeed's `_manual_backward_expected`), set from a hook on the stage output that runs as the
      received gradient arrives, before any parameter gradient.
    The module is already in DeepSpeed's precision, so no autocast.
    """

    def __init__(self, engine):
        self.engine = engine

    def autocast(self):
        return contextlib.nullcontext()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.engine.scale(loss)

    def certify_received_gradients(self):
        """A forward hook for a non-last stage's module: its output's incoming gradient is already scaled."""
        def certify(grad):
            self.engine._manual_backward_expected = True
            return grad

        def on_forward(module, args, out):
            if torch.is_tensor(out) and out.requires_grad:
                out.register_hook(certify)

        return self.engine.module.register_forward_hook(on_forward)


def _feed_gradient_free_stage(engine, params: list[torch.nn.Parameter], skipped: list[torch.nn.Parameter]) -> None:
    """A middle stage whose layers the step all skipped (sampling strata that cross stage boundaries, the
    default) produced no gradient at all, and ZeRO-1's engine.step() then fails: its gradient bucket was never
    filled (IndexError in reduce_ipg_grads). Backpropagate a zero through every parameter instead, so the stage
    reduces zeros like the plain engine's (adamw: momentum and weight decay still move them; freeze restores
    them)."""
    if not params or not {id(p) for p in params} <= {id(p) for p in skipped}:
        return
    engine._manual_backward_expected = True  # a zero needs no loss scale (fp16 certifies scaled backwards)
    torch.autograd.backward(torch.stack([p.sum() for p in params]).sum() * 0.0)


def pipelined_step(run, batches, step: int, plan, st: ParallelState, timer=None) -> torch.Tensor:
    """1F1B over the stage engines, tied-embedding sync, stale-gradient fix, one engine.step()."""
    engine = run.engine
    precision = _LossScale(engine)
    hook = None if st.is_last_stage else precision.certify_received_gradients()
    try:
        loss_sum = forward_backward(engine, batches, step, plan, st, timer, precision)
    finally:
        if hook is not None:
            hook.remove()
    params = [p for p in engine.module.parameters() if p.requires_grad]
    sync_tied_embedding_grads(params, st.embd_group)
    skipped = engine.module.skipped_parameters(plan)
    _feed_gradient_free_stage(engine, params, skipped)
    zero_stale_gradients(run, skipped)
    with frozen_during_step(run, engine.module, plan):
        engine.step()
    dist.all_reduce(loss_sum, group=st.pp_group)  # only the last stage computed a loss
    return loss_sum
