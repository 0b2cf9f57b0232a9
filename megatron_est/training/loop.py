"""The training loop: one sampled subnetwork per optimizer step, gradient accumulation over micro-batches."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_est.config import Config
from megatron_est.est.flops import step_flops
from megatron_est.est.sampler import Subnetwork, SubnetworkSampler
from megatron_est.est.unsampled import unsampled_policy
from megatron_est.model.language_model import LanguageModel
from megatron_est.parallel.grads import grad_norm_and_clip, sync_data_parallel_grads, sync_tied_embedding_grads
from megatron_est.parallel.state import ParallelState
from megatron_est.training.batches import MicroBatches
from megatron_est.training.evaluate import evaluate
from megatron_est.training.metrics import MetricsLog, format_train_line
from megatron_est.training.optimizer import learning_rate, set_lr
from megatron_est.training.pipeline_schedule import StageTimer, forward_backward


@dataclass
class TrainState:
    iteration: int = 0  # completed optimizer steps
    cumulative_flops: int = 0
    full_cumulative_flops: int = 0
    history: list = field(default_factory=list)  # every record written, for callers and tests


def subnetwork_summary(cfg: Config, sub: Subnetwork) -> dict:
    m = cfg.model
    kept = [sub.heads[i] for i in sub.layers]
    heads = sum(m.num_attention_heads if h is None else len(h) for h in kept)
    neurons = sum(m.ffn_hidden_size if n is None else len(n) for n in (sub.neurons[i] for i in sub.layers))
    n = max(1, len(sub.layers))
    return {"est_stage": sub.stage + 1, "kept_layers": len(sub.layers),
            "kept_heads_frac": heads / (n * m.num_attention_heads),
            "kept_mlp_frac": neurons / (n * m.ffn_hidden_size)}


def train_step(model: LanguageModel, optimizer: torch.optim.Optimizer, params: list, batches: MicroBatches,
               sub: Subnetwork, cfg: Config, st: ParallelState, step: int,
               timer: Optional[StageTimer] = None, precision=None, policy=None) -> tuple[float, float]:
    """Forward/backward over all micro-batches on the sampled subnetwork (1F1B when pipelined), then sync,
    clip, and step. Returns the step's mean loss and gradient norm, the same on every rank. policy: the run's
    est.unsampled policy (chosen from cfg when not given)."""
    policy = policy or unsampled_policy(cfg)
    plan = model.make_plan(sub, st.device)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = forward_backward(model, batches, step, plan, st, timer, precision)
    if st.pp > 1:
        sync_tied_embedding_grads(params, st.embd_group)
    sync_data_parallel_grads(params, st.dp_group, st.dp)
    policy.complete_grads(params)
    norm = float("nan")  # an fp16 step skipped for overflow has no gradient norm
    if precision is None or precision.unscale_and_check(params):
        norm = grad_norm_and_clip(params, cfg.train.clip_grad, st.tp_group, st.tp, st.pp_group, st.pp)
        set_lr(optimizer, learning_rate(cfg.train, step))
        policy.step(optimizer, model, plan)
    if st.pp > 1:  # only the last stage computed a loss: hand it to every stage (rank 0 logs)
        dist.all_reduce(loss_sum, group=st.pp_group)
    if st.dp > 1:
        dist.all_reduce(loss_sum, group=st.dp_group)
        loss_sum /= st.dp
    return float(loss_sum), norm


def train(cfg: Config, st: ParallelState, model: LanguageModel, optimizer: torch.optim.Optimizer,
          sampler: SubnetworkSampler, train_batches: MicroBatches, valid_batches: Optional[MicroBatches],
          state: Optional[TrainState] = None, log: Optional[MetricsLog] = None,
          after_step: Optional[Callable[[TrainState], bool]] = None, precision=None,
          step_fn: Optional[Callable] = None,
          extra_valid_batches: Optional[dict[str, MicroBatches]] = None,
          downstream: Optional[Callable] = None) -> TrainState:
    """Train from state.iteration to --train-iters. after_step(state), called on every rank after each
    step (checkpointing, exit signals), returns True to stop early. step_fn replaces train_step (the DeepSpeed
    engine's step; model is then the engine). extra_valid_batches: named held-out sets evaluated beside the
    validation split, logged as extra_val_loss[name]. downstream(model) -> {task: {metric: value}}: zero-shot
    tasks at each evaluation (evaluation/in_training.py), logged as downstream."""
    tr, m = cfg.train, cfg.model
    state = state or TrainState()
    step_fn = step_fn or functools.partial(train_step, policy=unsampled_policy(cfg))  # the policy, chosen once
    log = log or MetricsLog(tr.metrics_file, enabled=st.rank == 0)
    params = [p for p in model.parameters() if p.requires_grad]
    gbs = train_batches.gbs
    tokens_per_step = gbs * m.seq_length
    full_flops = step_flops(m, tokens_per_step)
    interval_loss, interval_n, interval_start = 0.0, 0, time.perf_counter()
    model.train()
    while state.iteration < tr.train_iters:
        step = state.iteration
        t0 = time.perf_counter()
        sub = sampler(step)
        loss, norm = step_fn(model, optimizer, params, train_batches, sub, cfg, st, step, precision=precision)
        step_time = time.perf_counter() - t0
        state.iteration += 1
        flops = step_flops(m, tokens_per_step, sub)
        state.cumulative_flops += flops
        state.full_cumulative_flops += full_flops
        interval_loss, interval_n = interval_loss + loss, interval_n + 1
        if state.iteration % tr.log_interval == 0 or state.iteration == tr.train_iters:
            now = time.perf_counter()
            rec = {"iteration": state.iteration, "lm_loss": interval_loss / interval_n,
                   "lr": learning_rate(tr, step), "grad_norm": norm, "tokens": state.iteration * tokens_per_step,
                   "consumed_samples": state.iteration * gbs, "global_batch_size": gbs,
                   "step_flops": flops, "full_step_flops": full_flops,
                   "cumulative_flops": state.cumulative_flops,
                   "full_cumulative_flops": state.full_cumulative_flops,
                   "flops_saved_frac": 1.0 - state.cumulative_flops / state.full_cumulative_flops,
                   **subnetwork_summary(cfg, sub), "step_time_s": step_time,
                   "interval_time_s": (now - interval_start) / interval_n,
                   **(precision.metrics() if precision is not None else {})}
            log.print(format_train_line(rec, tr.train_iters))
            log.record(rec)
            state.history.append(rec)
            interval_loss, interval_n, interval_start = 0.0, 0, time.perf_counter()
        if valid_batches is not None and (state.iteration % tr.eval_interval == 0
                                          or state.iteration == tr.train_iters):
            t_eval = time.perf_counter()
            val = evaluate(model, valid_batches, tr.eval_iters, st, precision)  # the run's autocast
            rec = {"iteration": state.iteration, "val_loss": val, "cumulative_flops": state.cumulative_flops,
                   "full_cumulative_flops": state.full_cumulative_flops}
            log.print(f" validation loss at iteration {state.iteration} | lm loss: {val:.6E} |")
            if extra_valid_batches:
                rec["extra_val_loss"] = {name: evaluate(model, b, tr.eval_iters, st, precision)
                                         for name, b in extra_valid_batches.items()}
                log.print("".join(f" {name} loss: {v:.6E} |" for name, v in rec["extra_val_loss"].items()))
            if downstream is not None:
                rec["downstream"] = downstream(model)
                log.print(" downstream:" + "".join(f" {t} acc {r['acc']:.4f} |" for t, r in rec["downstream"].items()))
            log.record(rec)
            state.history.append(rec)
            interval_start += time.perf_counter() - t_eval  # evaluation is not training time
        if after_step is not None and after_step(state):
            break
    return state
