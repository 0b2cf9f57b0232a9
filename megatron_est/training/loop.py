"""The training loop: one sampled subnetwork per optimizer step, logging, evaluation, and the after-step hook."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron_est.config import Config
from megatron_est.est.flops import step_flops
from megatron_est.est.sampler import Subnetwork, SubnetworkSampler
from megatron_est.parallel.state import ParallelState
from megatron_est.training.batches import MicroBatches
from megatron_est.training.engine import Engine, StepResult
from megatron_est.training.evaluate import evaluate
from megatron_est.training.metrics import MetricsLog, format_train_line
from megatron_est.training.optimizer import step_lr
from megatron_est.training.state import TrainState
from megatron_est.training.throughput import device_peak_tflops, throughput


def subnetwork_summary(cfg: Config, sub: Subnetwork) -> dict:
    m = cfg.model
    kept = [sub.heads[i] for i in sub.layers]
    heads = sum(m.num_attention_heads if h is None else len(h) for h in kept)
    neurons = sum(m.ffn_hidden_size if n is None else len(n) for n in (sub.neurons[i] for i in sub.layers))
    n = max(1, len(sub.layers))
    return {"est_stage": sub.stage + 1, "kept_layers": len(sub.layers),
            "kept_heads_frac": heads / (n * m.num_attention_heads),
            "kept_mlp_frac": neurons / (n * m.ffn_hidden_size)}


class NonFiniteError(RuntimeError):
    """--max-nonfinite-steps steps in a row had a non-finite loss or gradient norm."""


@dataclass
class _Interval:
    """What the steps since the last log line add up to (non-finite steps are left out of the mean loss)."""
    loss: float = 0.0
    finite: int = 0
    steps: int = 0
    flops: int = 0
    full_flops: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, result: StepResult, flops: int, full_flops: int) -> None:
        self.steps, self.flops, self.full_flops = self.steps + 1, self.flops + flops, self.full_flops + full_flops
        if not result.nonfinite:
            self.loss, self.finite = self.loss + result.loss, self.finite + 1


def train(cfg: Config, st: ParallelState, engine: Engine, sampler: SubnetworkSampler, train_batches: MicroBatches,
          valid_batches: Optional[MicroBatches] = None, *, state: Optional[TrainState] = None,
          log: Optional[MetricsLog] = None, after_step: Optional[Callable[[TrainState], bool]] = None,
          extra_valid_batches: Optional[dict[str, MicroBatches]] = None,
          downstream: Optional[Callable] = None) -> TrainState:
    """Train from state.iteration to --train-iters, one engine step per iteration (training/engine.py).
    after_step(state), called on every rank after each step (checkpointing, exit signals), returns True to stop
    early. extra_valid_batches: named held-out sets evaluated beside the validation split, logged as
    extra_val_loss[name]. downstream(model) -> {task: {metric: value}}: zero-shot tasks at each evaluation
    (evaluation/in_training.py), logged as downstream.

    A step the engine reports non-finite made no update; it still counts as an iteration (its batch is passed
    over, as Megatron does with skipped fp16 steps). --max-nonfinite-steps of them in a row raise
    NonFiniteError before after_step, so nothing is saved after them."""
    tr, m = cfg.train, cfg.model
    state = state or TrainState()
    log = log or MetricsLog(tr.metrics_file, enabled=st.rank == 0)
    tokens_per_step = train_batches.gbs * m.seq_length
    shape = _Shape(train_batches.gbs, tokens_per_step, step_flops(m, tokens_per_step), st.world_size,
                   tr.peak_tflops or device_peak_tflops(st.device))
    interval, in_a_row = _Interval(), 0
    engine.model.train()
    while state.iteration < tr.train_iters:
        step = state.iteration
        t0 = time.perf_counter()
        sub = sampler(step)
        result = engine.step(train_batches, sub, step)
        step_time = time.perf_counter() - t0
        state.iteration += 1
        flops = step_flops(m, tokens_per_step, sub)
        state.cumulative_flops += flops
        state.full_cumulative_flops += shape.full_flops
        interval.add(result, flops, shape.full_flops)
        in_a_row = in_a_row + 1 if result.nonfinite else 0
        state.nonfinite_steps += int(result.nonfinite)
        if state.iteration % tr.log_interval == 0 or state.iteration == tr.train_iters or in_a_row:
            rec = _train_record(cfg, state, interval, shape, sub, result, flops, step_time)
            rec.update(engine.metrics())
            log.print(format_train_line(rec, tr.train_iters))
            log.record(rec)
            state.history.append(rec)
            interval = _Interval()
        if in_a_row >= tr.max_nonfinite_steps:
            raise NonFiniteError(
                f"{in_a_row} steps in a row (iterations {state.iteration - in_a_row + 1}-{state.iteration}) had a "
                f"non-finite loss or gradient norm (last: loss {result.loss}, grad norm {result.grad_norm}); "
                f"stopping without saving, the last checkpoint holds the weights from before them "
                f"(--max-nonfinite-steps {tr.max_nonfinite_steps}; lower --lr, or check the data)")
        if valid_batches is not None and (state.iteration % tr.eval_interval == 0
                                          or state.iteration == tr.train_iters):
            t_eval = time.perf_counter()
            _evaluate(cfg, st, engine, state, log, valid_batches, extra_valid_batches, downstream)
            interval.start += time.perf_counter() - t_eval  # evaluation is not training time
        if after_step is not None and after_step(state):
            break
    return state


@dataclass(frozen=True)
class _Shape:
    """What every step of the run has in common."""
    gbs: int
    tokens_per_step: int
    full_flops: int  # of one full-model step
    world_size: int
    peak_tflops: Optional[float]


def _train_record(cfg: Config, state: TrainState, interval: _Interval, shape: _Shape, sub: Subnetwork,
                  result: StepResult, flops: int, step_time: float) -> dict:
    seconds = time.perf_counter() - interval.start
    return {"iteration": state.iteration,
            "lm_loss": interval.loss / interval.finite if interval.finite else float("nan"),
            "lr": step_lr(cfg, state.iteration - 1, sub), "grad_norm": result.grad_norm,
            "tokens": state.iteration * shape.tokens_per_step, "consumed_samples": state.iteration * shape.gbs,
            "global_batch_size": shape.gbs, "step_flops": flops, "full_step_flops": shape.full_flops,
            "cumulative_flops": state.cumulative_flops, "full_cumulative_flops": state.full_cumulative_flops,
            "flops_saved_frac": 1.0 - state.cumulative_flops / state.full_cumulative_flops,
            **subnetwork_summary(cfg, sub), "step_time_s": step_time, "interval_time_s": seconds / interval.steps,
            "nonfinite_steps": state.nonfinite_steps,
            **throughput(interval.steps * shape.tokens_per_step, interval.flops, interval.full_flops, seconds,
                         shape.world_size, shape.peak_tflops)}


def _evaluate(cfg: Config, st: ParallelState, engine: Engine, state: TrainState, log: MetricsLog,
              valid_batches: MicroBatches, extra_valid_batches: Optional[dict[str, MicroBatches]],
              downstream: Optional[Callable]) -> None:
    """The full model on the validation split, the extra held-out sets and the zero-shot tasks."""
    iters = cfg.train.eval_iters
    val = evaluate(engine.model, valid_batches, iters, st, engine.precision)  # the run's autocast
    rec = {"iteration": state.iteration, "val_loss": val, "cumulative_flops": state.cumulative_flops,
           "full_cumulative_flops": state.full_cumulative_flops}
    log.print(f" validation loss at iteration {state.iteration} | lm loss: {val:.6E} |")
    if extra_valid_batches:
        rec["extra_val_loss"] = {name: evaluate(engine.model, b, iters, st, engine.precision)
                                 for name, b in extra_valid_batches.items()}
        log.print("".join(f" {name} loss: {v:.6E} |" for name, v in rec["extra_val_loss"].items()))
    if downstream is not None:
        rec["downstream"] = downstream(engine.model)
        log.print(" downstream:" + "".join(f" {t} acc {r['acc']:.4f} |" for t, r in rec["downstream"].items()))
    log.record(rec)
    state.history.append(rec)
