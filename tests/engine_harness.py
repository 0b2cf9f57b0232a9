"""A small training run on random tokens for engine, precision and checkpoint tests (one call per phase)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_est.config import (CheckpointConfig, Config, EngineConfig, ESTConfig, ParallelConfig, TrainConfig)
from megatron_est.model.build import build_model  # noqa: F401 (tests build bare models through the harness)
from megatron_est.parallel.state import ParallelState, build_groups
from megatron_est.training.batches import MicroBatches, RandomTokens
from megatron_est.training.build import build_run
from megatron_est.training.checkpoint_layout import resolve_load
from megatron_est.training.evaluate import evaluate
from megatron_est.training.metrics import MetricsLog
from tests.helpers import tiny

# Crosses all three EST stages in 8 iterations: all dimensions sampled, then heads/neurons, then the full model.
EST_SCHEDULE = "0:0.5,0.5,0.5;3:0.5,0.5,1;6:1,1,1"


def make_cfg(family: str = "gpt2", tp: int = 1, pp: int = 1, iters: int = 8, gbs: int = 8, mbs: int = 2,
             schedule: str = EST_SCHEDULE, checkpoint: Optional[dict] = None, engine: Optional[dict] = None,
             unsampled: str = "adamw", **model_kw) -> Config:
    # 250 tokens, no vocabulary padding: our loss then equals transformers' loss on exported weights.
    model = tiny(family, **{"num_layers": 4, "make_vocab_size_divisible_by": 50, **model_kw})
    # Fixed strata so that every parallel layout draws the same subnetworks.
    est = ESTConfig(schedule=schedule, tp_strata=2, pp_strata=2, unsampled_update=unsampled)
    tr = TrainConfig(micro_batch_size=mbs, global_batch_size=gbs, train_iters=iters, lr=3e-3, min_lr=3e-4,
                     lr_warmup_iters=2, log_interval=1, eval_interval=10 ** 6, seed=11)
    return Config(model=model, parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                                       pipeline_model_parallel_size=pp),
                  est=est, train=tr, checkpoint=CheckpointConfig(**(checkpoint or {})),
                  engine=EngineConfig(**(engine or {})))


def with_checkpoint(cfg: Config, **kw) -> Config:
    return dataclasses.replace(cfg, checkpoint=CheckpointConfig(**kw))


def parallel_state(rank: int, world: int, cfg: Config) -> ParallelState:
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    st = ParallelState(world, rank, tp, pp, world // (tp * pp))
    return build_groups(st) if world > 1 else st


def dataset(cfg: Config) -> RandomTokens:
    return RandomTokens(cfg.model.vocab_size, cfg.model.seq_length, n=512, seed=5)


def run_plain(cfg: Config, st: ParallelState, hooks=None) -> dict:
    """Train with the plain torch engine (resuming from --load when set); per-iteration losses and the end."""
    result = _run(cfg, st, hooks)
    module = result.pop("module")
    return {**result, "model": {k: v.detach().clone() for k, v in module.state_dict().items()}}


def _run(cfg: Config, st: ParallelState, hooks=None) -> dict:
    """Build the run as the entry point does (training/build.py), train it, and collect the results."""
    run = build_run(cfg, st, dataset(cfg), log=MetricsLog(None, enabled=False), resume=resolve_load(cfg))
    start = run.state.iteration
    if hooks is not None:
        hooks(model=run.engine.model, batches=run.train_batches, ckpt=run.ckpt)
    try:
        state = run.train()
    finally:
        run.ckpt.close()
    result = {**_results(cfg, st, run.engine.model, state, start), "module": run.engine.module}
    run.engine.close()
    return result


def _results(cfg: Config, st: ParallelState, model, state, start: int) -> dict:
    """Per-iteration losses and records, the global RNG after training (checkpoints restore it), and the loss
    of the trained model on samples [0, gbs) of a held-out set (through the pipeline when pp > 1)."""
    records = [r for r in state.history if "lm_loss" in r]
    rand = torch.rand(3)
    gbs = cfg.train.global_batch_size
    held_out = MicroBatches(held_out_dataset(cfg), gbs, cfg.train.micro_batch_size, st.dp, st.dp_rank)
    return {"start": start, "end": state.iteration, "losses": {r["iteration"]: r["lm_loss"] for r in records},
            "rand": rand, "val_loss": evaluate(model, held_out, 1, st), "records": records}


def held_out_dataset(cfg: Config) -> RandomTokens:
    return RandomTokens(cfg.model.vocab_size, cfg.model.seq_length, n=64, seed=6)


def run_deepspeed(cfg: Config, st: ParallelState, hooks=None) -> dict:
    """Like run_plain, through the DeepSpeed engine (cfg.engine.deepspeed with --zero-stage or a JSON)."""
    import gc

    from megatron_est.validation import validate

    cfg = validate(cfg, st.world_size).config  # what the DeepSpeed JSON decides, as the entry point does
    result = _run(cfg, st, hooks)
    del result["module"]
    gc.collect()
    return result
