"""Up-front refusal of invalid flags and flag combinations: one line naming the flag, before any process group,
model or file exists. The one top-level validation step: each package checks its own part (model/checks.py,
parallel/checks.py, est/checks.py, training/checks.py) and this module only imports downward, so no package
imports it back.

Order is root causes first: each value on its own (config.check_fields), then the model's shapes, the layout
(which needs the world size), EST, batches, the learning rate and the engine. Nothing is mutated: `validate`
returns what the run resolves to (`Resolved`), including a config with what a DeepSpeed JSON decides written in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron_est.config import (EVAL_INTERVAL_CAP, EVALS_PER_RUN, WARMUP_CAP, WARMUP_FRACTION, Config,
                                 check_fields)
from megatron_est.est.balance import balance_note
from megatron_est.est.checks import check_est
from megatron_est.est.schedule import Schedule
from megatron_est.model.checks import check_model
from megatron_est.parallel.checks import check_parallel
from megatron_est.parallel.layout import Layout
from megatron_est.training.checks import (check_batches, check_checkpoint_flags, check_engine,
                                          check_schedule_flags)


@dataclass(frozen=True)
class Resolved:
    """What a valid config resolves to for a world of `layout.world_size` ranks."""
    config: Config  # the input, with the precision and ZeRO stage a DeepSpeed JSON decides written in
    layout: Layout
    global_batch_size: int
    micro_batches: int  # per data-parallel rank per optimizer step (gradient accumulation)
    precision: str  # fp32 | bf16 | fp16
    zero_stage: Optional[int]  # None without --deepspeed
    schedule: Schedule  # the EST schedule against --train-iters (before any --est-target-saving fit)
    notes: tuple[str, ...]  # defaults this run chose for the user: rank 0 logs them once at start


def validate(cfg: Config, world_size: int) -> Resolved:
    """Refuse invalid combinations up front (before any process group exists), one line naming the flags."""
    check_fields(cfg)
    check_model(cfg.model)
    layout = check_parallel(cfg, world_size)
    schedule = check_est(cfg)
    gbs = check_batches(cfg, layout)
    check_schedule_flags(cfg)
    check_checkpoint_flags(cfg)
    engine = check_engine(cfg, layout)
    return Resolved(config=_with_engine(cfg, engine.precision, engine.zero_stage), layout=layout,
                    global_batch_size=gbs, micro_batches=layout.micro_batches(cfg.train, gbs),
                    precision=engine.precision, zero_stage=engine.zero_stage, schedule=schedule,
                    notes=_notes(cfg, layout, gbs, schedule))


def _with_engine(cfg: Config, precision: str, zero_stage: Optional[int]) -> Config:
    e = cfg.engine
    if e.precision == precision and e.zero_stage == zero_stage:
        return cfg
    engine = dataclasses.replace(e, bf16=precision == "bf16", fp16=precision == "fp16", zero_stage=zero_stage)
    return dataclasses.replace(cfg, engine=engine)


def _notes(cfg: Config, layout: Layout, gbs: int, schedule: Schedule) -> tuple[str, ...]:
    tr, out = cfg.train, []
    scaled = tr.scaled_defaults()
    if "lr_warmup_iters" in scaled:
        out.append(f"> --lr-warmup-iters not given: {tr.lr_warmup_iters} ({WARMUP_FRACTION:g} x --train-iters "
                   f"{tr.train_iters}, at most {WARMUP_CAP})")
    if "eval_interval" in scaled:
        out.append(f"> --eval-interval not given: {tr.eval_interval} (1/{EVALS_PER_RUN} of --train-iters "
                   f"{tr.train_iters}, at most {EVAL_INTERVAL_CAP})")
    if tr.lr_warmup_iters >= tr.train_iters > 1:
        out.append(f"warning: --lr-warmup-iters {tr.lr_warmup_iters} >= --train-iters {tr.train_iters}: the "
                   f"learning rate never reaches --lr {tr.lr:g}")
    if tr.global_batch_size is None:
        out.append(f"warning: --global-batch-size not given: {gbs} = --micro-batch-size {tr.micro_batch_size} x "
                   f"data-parallel size {layout.dp}; it changes with the number of ranks (give it to train the "
                   "same way on any layout)")
    balance = balance_note(cfg, schedule)
    if balance is not None:
        out.append(balance)
    return tuple(out)
