"""The engine protocol, and the plain torch engine that implements it.

An engine owns everything between "here is this step's subnetwork and its micro-batches" and "the parameters have
moved": forward/backward (1F1B when pipelined), gradient reduction, precision, clipping and the optimizer step,
plus how its part of a checkpoint is written and read. The loop (training/loop.py) and the checkpointer
(training/checkpointing.py) talk to an engine only through this protocol, so they have no engine branches:

    step(batches, sub, step, timer)   -> StepResult         one optimizer step, the same result on every rank
    metrics()                          -> dict               engine scalars for the log (fp16 loss scale, ...)
    save(tmp_dir, name, payload)                             this rank's files of a checkpoint (a collective)
    published(root, name)                                    rank 0, after the latest pointer moved
    load(root, iteration, meta, load_optimizer) -> payload   restore them; the payload holds iteration and RNG
    close()

plus `kind` (recorded in the checkpoint metadata), `module` (this rank's bare model: its stage of the pipeline),
`model` (what evaluation calls: the module, or the DeepSpeed engine around it) and `precision` (the autocast the
run evaluates under, or None). TorchEngine is below; DeepSpeedEngine (training/deepspeed_engine.py) wraps
DeepSpeed's. training/build.py picks one from the config.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.distributed as dist

from megatron_est.config import Config
from megatron_est.est.sampler import Subnetwork
from megatron_est.est.unsampled import unsampled_policy
from megatron_est.parallel.grad_overlap import OverlappedGradReduce
from megatron_est.parallel.grads import grad_norm_and_clip, sync_data_parallel_grads, sync_tied_embedding_grads
from megatron_est.parallel.state import ParallelState
from megatron_est.training.batches import MicroBatches
from megatron_est.training.checkpoint_layout import SHARD_FILE, shard_dir_name
from megatron_est.training import checkpointing
from megatron_est.training.checkpointing import load_model_weights, read_shard
from megatron_est.training.optimizer import (build_optimizer, load_optimizer_state,
                                             optimizer_state_for_checkpoint, set_lr, step_lr)
from megatron_est.training.pipeline_schedule import StageTimer, forward_backward
from megatron_est.training.precision import Precision, build_precision


@dataclass
class StepResult:
    """What one step did, the same on every rank (the loss and gradient norm are reduced before any decision)."""
    loss: float  # mean loss of the step's global batch
    grad_norm: float  # before clipping; nan when the step was skipped before it was measured
    nonfinite: bool = False  # the loss or gradient norm was inf/nan: the step was skipped (no update at all)


class Engine(Protocol):
    kind: str
    module: torch.nn.Module
    precision: Optional[Precision]

    @property
    def model(self) -> torch.nn.Module: ...

    def step(self, batches: MicroBatches, sub: Subnetwork, step: int,
             timer: Optional[StageTimer] = None) -> StepResult: ...

    def metrics(self) -> dict: ...

    def save(self, tmp_dir: str, name: str, payload: dict) -> None: ...

    def published(self, root: str, name: str) -> None: ...

    def load(self, root: str, iteration: int, meta: dict, load_optimizer: bool) -> dict: ...

    def close(self) -> None: ...


class TorchEngine:
    """Plain torch: our 1F1B schedule, our data-parallel all-reduce, torch AdamW (or apex's FusedAdam), torch
    autocast for bf16/fp16 with our loss scaler, and the EST unsampled-update policy chosen once from the config."""

    kind = "torch"

    def __init__(self, cfg: Config, st: ParallelState, module: torch.nn.Module,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        self.cfg, self.st, self.module = cfg, st, module
        self.optimizer = optimizer or build_optimizer(module, cfg.train, cfg.engine.use_apex)
        self.precision = build_precision(cfg.engine, st.device)
        self.policy = unsampled_policy(cfg)
        self.params = [p for p in module.parameters() if p.requires_grad]
        # data-parallel averaging overlapped with the last micro-batch's backward (a no-op at DP 1); None: after it
        self.grad_reduce = (OverlappedGradReduce(self.params, st.dp_group, st.dp)
                            if cfg.engine.overlap_grad_reduce else None)

    @property
    def model(self) -> torch.nn.Module:
        return self.module

    def step(self, batches: MicroBatches, sub: Subnetwork, step: int,
             timer: Optional[StageTimer] = None) -> StepResult:
        """Forward/backward over all micro-batches on the sampled subnetwork (1F1B when pipelined), then sync,
        clip, and step."""
        st, params, optimizer = self.st, self.params, self.optimizer
        plan = self.module.make_plan(sub, st.device)
        optimizer.zero_grad(set_to_none=True)
        if self.grad_reduce is not None:
            self.grad_reduce.begin(self.module.skipped_parameters(plan), batches.num_micro)
        loss_sum = forward_backward(self.module, batches, step, plan, st, timer, self.precision)
        if st.pp > 1:
            sync_tied_embedding_grads(params, st.embd_group)
        if self.grad_reduce is not None:
            self.grad_reduce.finish()
        else:
            sync_data_parallel_grads(params, st.dp_group, st.dp)
        if st.pp > 1:  # only the last stage computed a loss: hand it to every stage (rank 0 logs)
            dist.all_reduce(loss_sum, group=st.pp_group)
        if st.dp > 1:
            dist.all_reduce(loss_sum, group=st.dp_group)
            loss_sum /= st.dp
        loss = float(loss_sum)
        if self.precision is not None and not self.precision.unscale_and_check(params):
            # an fp16 overflow: skipped and counted by the loss scaler (no gradient norm); a normal event, not a
            # non-finite step unless the loss itself is not finite
            return StepResult(loss, float("nan"), nonfinite=not math.isfinite(loss))
        norm = grad_norm_and_clip(params, self.cfg.train.clip_grad, st.tp_group, st.tp, st.pp_group, st.pp)
        if not (math.isfinite(loss) and math.isfinite(norm)):  # the same decision on every rank: both are reduced
            return StepResult(loss, norm, nonfinite=True)
        set_lr(optimizer, step_lr(self.cfg, step, sub))
        # zero gradients for what the subnetwork did not reach (adamw) only now: they add nothing to the norm and
        # need no clipping, so neither reads them
        self.policy.complete_grads(params)
        self.policy.step(optimizer, self.module, plan)
        return StepResult(loss, norm)

    def metrics(self) -> dict:
        return self.precision.metrics() if self.precision is not None else {}

    def save(self, tmp_dir: str, name: str, payload: dict) -> None:
        """One file per (tensor, pipeline) rank, written by data-parallel rank 0 (the others hold copies)."""
        st = self.st
        if st.dp_rank != 0:
            return
        shard_dir = os.path.join(tmp_dir, shard_dir_name(st.tp_rank, st.pp_rank, st.pp))
        os.makedirs(shard_dir, exist_ok=True)
        payload = {**payload, "model": self.module.state_dict(),
                   "optimizer": optimizer_state_for_checkpoint(self.optimizer),
                   "grad_scaler": self.precision.state_dict() if self.precision is not None else None}
        checkpointing._save_file(payload, os.path.join(shard_dir, SHARD_FILE))  # via the module: tests patch it

    def published(self, root: str, name: str) -> None:
        pass

    def load(self, root: str, iteration: int, meta: dict, load_optimizer: bool) -> dict:
        payload, path = read_shard(root, iteration, self.st)
        load_model_weights(self.module, payload, path)
        if load_optimizer and payload.get("optimizer") is not None:
            load_optimizer_state(self.optimizer, payload["optimizer"])
        if load_optimizer and self.precision is not None and payload.get("grad_scaler"):
            self.precision.load_state_dict(payload["grad_scaler"])
        return payload

    def close(self) -> None:
        if self.grad_reduce is not None:
            self.grad_reduce.remove()
