"""One run builder for the entry point, the tests and the benchmarks: model -> engine -> batches -> checkpointer.

    run = build_run(cfg, st, train_ds, valid_ds, log=log, resume=resolve_load(cfg))
    state = run.train()
    run.close()

Everything a run is made of is chosen here, once, from the config: the engine (plain torch or DeepSpeed, behind
training/engine.py's protocol), the EST sampler, the micro-batch views of each dataset, and the checkpointer with
the state it resumed (or a fresh one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron_est.config import Config
from megatron_est.est.build import build_sampler
from megatron_est.est.sampler import SubnetworkSampler
from megatron_est.kernels import configure_kernels
from megatron_est.model.build import build_model
from megatron_est.parallel.state import ParallelState
from megatron_est.training.batches import MicroBatches
from megatron_est.training.checkpointing import Checkpointer, setup_checkpointing
from megatron_est.training.engine import Engine, TorchEngine
from megatron_est.training.loop import train
from megatron_est.training.metrics import MetricsLog
from megatron_est.training.precision import configure_model
from megatron_est.training.state import TrainState


def build_engine(cfg: Config, st: ParallelState, module: torch.nn.Module, log: Optional[MetricsLog] = None,
                 resume: Optional[tuple[str, int]] = None) -> Engine:
    """DeepSpeed's engine under --deepspeed (deepspeed is imported only then), else the plain torch engine.
    resume: a weights-only checkpoint is loaded into the bare module before DeepSpeed wraps it."""
    configure_model(cfg, module)  # activation recompute, apex switch
    if cfg.engine.deepspeed:
        from megatron_est.training import deepspeed_engine

        engine = deepspeed_engine.initialize(cfg, st, module, log, resume)
    else:
        engine = TorchEngine(cfg, st, module)
    if log is not None:  # TF32 on/off, apex or torch kernels
        log.print(configure_kernels(cfg.engine, st.device, getattr(engine, "optimizer", None)))
    return engine


@dataclass
class Run:
    cfg: Config
    st: ParallelState
    engine: Engine
    sampler: SubnetworkSampler
    train_batches: MicroBatches
    valid_batches: Optional[MicroBatches]
    ckpt: Checkpointer
    state: TrainState  # where the run starts: resumed or fresh
    log: MetricsLog
    extra_valid_batches: dict[str, MicroBatches] = field(default_factory=dict)
    downstream: Optional[Callable] = None  # --eval-tasks (evaluation/in_training.py)

    def train(self) -> TrainState:
        self.state = train(self.cfg, self.st, self.engine, self.sampler, self.train_batches, self.valid_batches,
                           state=self.state, log=self.log, after_step=self.ckpt.after_step,
                           extra_valid_batches=self.extra_valid_batches, downstream=self.downstream)
        return self.state

    def close(self) -> None:
        """Restores the signal handlers and releases the engine (before the process group goes)."""
        self.ckpt.close()
        self.engine.close()


def build_run(cfg: Config, st: ParallelState, train_ds, valid_ds=None, *, log: MetricsLog,
              resume: Optional[tuple[str, int]] = None, extra_valid_ds: Optional[dict] = None,
              downstream: Optional[Callable] = None) -> Run:
    """This rank's model (its pipeline stage), engine, batches and checkpointer; `resume` (resolve_load) is
    loaded, else the run starts fresh."""
    engine = build_engine(cfg, st, build_model(cfg, st), log, resume)
    gbs = st.layout.global_batch(cfg.train)

    def batches(ds) -> MicroBatches:
        return MicroBatches(ds, gbs, cfg.train.micro_batch_size, st.dp, st.dp_rank)

    ckpt, state = setup_checkpointing(cfg, st, engine, gbs, log, resume)
    return Run(cfg, st, engine, build_sampler(cfg), batches(train_ds),
               batches(valid_ds) if valid_ds is not None else None, ckpt, state, log,
               {name: batches(ds) for name, ds in (extra_valid_ds or {}).items()}, downstream)
