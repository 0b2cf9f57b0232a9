"""The training package's own refusals: batch sizes against the layout, the learning-rate schedule, checkpoint
and engine flags, and the DeepSpeed JSON (read and checked here, never imported). Nothing is changed: what the
flags and the JSON decide together (precision, ZeRO stage) is returned."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_est.config import Config, ConfigError
from megatron_est.parallel.layout import Layout
from megatron_est.training.deepspeed_config import check_deepspeed


@dataclass(frozen=True)
class EngineChoice:
    precision: str  # fp32 | bf16 | fp16: the flags', or the DeepSpeed JSON's when it enables one
    zero_stage: Optional[int]  # None without --deepspeed


def check_batches(cfg: Config, layout: Layout) -> int:
    """The global batch, refused unless it splits into whole micro-batches on every data-parallel rank."""
    tr = cfg.train
    gbs = layout.global_batch(tr)
    if gbs % (tr.micro_batch_size * layout.dp):
        raise ConfigError(f"--global-batch-size {gbs} is not divisible by --micro-batch-size {tr.micro_batch_size} "
                          f"x data-parallel size {layout.dp}")
    return gbs


def check_schedule_flags(cfg: Config) -> None:
    tr = cfg.train
    if tr.min_lr > tr.lr:
        raise ConfigError(f"--min-lr {tr.min_lr:g} must be in [0, --lr {tr.lr:g}]")


def check_checkpoint_flags(cfg: Config) -> None:
    ck = cfg.checkpoint
    if ck.save_interval is not None and not ck.save:
        raise ConfigError("--save-interval needs --save")
    if ck.exit_signal_handler and not ck.save:
        raise ConfigError("--exit-signal-handler needs --save (where to save on exit)")


def check_engine(cfg: Config, layout: Layout) -> EngineChoice:
    e = cfg.engine
    if e.bf16 and e.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive")
    if e.recompute_num_layers is not None and e.recompute_granularity != "full":
        raise ConfigError("--recompute-num-layers needs --recompute-granularity full")
    if not e.deepspeed:
        if e.zero_stage is not None or e.offload_optimizer:
            raise ConfigError("--zero-stage and --offload-optimizer need --deepspeed")
        return EngineChoice(e.precision, None)
    precision, stage = check_deepspeed(cfg, layout.tp, layout.pp, layout.dp)
    return EngineChoice(precision, stage)
