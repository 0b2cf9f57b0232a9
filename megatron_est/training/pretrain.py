"""Entry point shared by pretrain_gpt.py and pretrain_llama.py: parse, validate, build, train, report."""
from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from typing import NoReturn, Optional

import torch
import torch.distributed as dist

from megatron_est.arguments import parse_args
from megatron_est.config import Config, ConfigError
from megatron_est.validation import validate
from megatron_est.data.errors import DataError
from megatron_est.est.fit import describe_schedule
from megatron_est.evaluation.in_training import downstream_evaluator
from megatron_est.host_memory import keep_freed_memory
from megatron_est.parallel import state as pstate
from megatron_est.training.build import build_run
from megatron_est.training.checkpoint_layout import precheck_load, resolve_load
from megatron_est.training.loop import NonFiniteError
from megatron_est.training.metrics import MetricsLog
from megatron_est.training.quiet import quiet_third_party
from megatron_est.training.scalar_logs import build_sinks
from megatron_est.training.state import TrainState


def fail(msg: str) -> NoReturn:
    """One clear line on stderr and exit status 2. Every rank prints it (they all refuse the same input), so
    whichever rank torchrun's or srun's summary names has said why."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


# How gloo reports a peer that died or closed its connections (NCCL raises a DistError subclass instead).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def crash(e: Exception) -> NoReturn:
    """End this process after an error with the process groups up, printing one last line that names the cause:
    status 2 for refused input (the same line on every rank), 1 otherwise.

    A rank whose collective failed because a peer went away prints only that line (the peer's own error is the
    one to read); any other error gets its traceback first. Then os._exit: the interpreter's teardown after a
    failed collective took 4-5 s here (C++ destructors, measured), and the launcher is waiting for this exit to
    stop the other ranks. Metrics and checkpoints are already flushed or atomically written."""
    code, rank = 1, pstate.env_rank_and_world()[0]
    text = str(e).strip().splitlines()
    cause = f"{type(e).__name__}: {text[0] if text else ''}"
    if isinstance(e, (ConfigError, DataError)):
        code, msg = 2, str(e)
    elif isinstance(e, NonFiniteError):  # every rank took the same decision; the cause is in the message
        msg = f"rank {rank}: {e}"
    elif isinstance(e, dist.DistError) or any(s in str(e) for s in _PEER_GONE):
        msg = (f"rank {rank}: lost contact with the other ranks (one failed first, was killed or is unreachable; "
               f"see its log): {cause}")
    else:
        traceback.print_exception(e)
        msg = f"rank {rank}: {cause}"
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def build_data(cfg: Config, st: pstate.ParallelState):
    """Tokenizer plus train/valid datasets; the bundled Shakespeare corpus when --data-path is not given."""
    from megatron_est.data import builder, default_corpus, tokenizers

    d, tr = cfg.data, cfg.train
    data_path, tok_model = d.data_path, d.tokenizer_model
    if not data_path:
        data_path, default_model = default_corpus.prepare_default_corpus(d.cache_dir)
        tok_model = tok_model or default_model
    tok = tokenizers.build_tokenizer(d.tokenizer_type, tok_model, d.vocab_file, d.merge_file)
    gbs = st.layout.global_batch(tr)
    n_samples = (tr.train_iters * gbs, tr.eval_iters * gbs, 0)
    index_dir = os.path.join(d.cache_dir, "index")
    wait_s = cfg.parallel.distributed_timeout_minutes * 60  # how long the other ranks wait for rank 0's build
    train_ds, valid_ds, _ = builder.build_train_valid_test_datasets(
        data_path, d.split, cfg.model.seq_length, tr.seed, n_samples, index_dir, vocab_size=tok.vocab_size,
        timeout_s=wait_s)
    extra = {}  # name -> dataset of all documents of that prefix
    for prefix in d.extra_valid_data_path:
        name = extra_valid_name(prefix)
        if name in extra:
            raise DataError(f"--extra-valid-data-path: two prefixes share the name {name!r}; rename one")
        extra[name] = builder.build_train_valid_test_datasets(
            prefix, "0,1,0", cfg.model.seq_length, tr.seed, (0, n_samples[1], 0), index_dir,
            vocab_size=tok.vocab_size, timeout_s=wait_s)[1]
    return tok, train_ds, valid_ds, extra


def extra_valid_name(prefix: str) -> str:
    """Log name of an extra validation set: its file name without Megatron's _text_document suffix."""
    name = os.path.basename(prefix.rstrip("/"))
    return name[: -len("_text_document")] if name.endswith("_text_document") else name


def run(cfg: Config, st: pstate.ParallelState) -> TrainState:
    tok, train_ds, valid_ds, extra_ds = build_data(cfg, st)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tok.vocab_size))
    resolved = validate(cfg, st.world_size)  # again: the vocabulary now comes from the tokenizer
    cfg = resolved.config  # with what a DeepSpeed JSON decides (precision, ZeRO stage) written in
    resume = resolve_load(cfg)  # a missing or mismatched --load is refused before anything is built
    log = MetricsLog(cfg.train.metrics_file, enabled=st.rank == 0, append=resume is not None,
                     keep_through=None if resume is None else resume[1])  # drop records past the checkpoint
    log.sinks = build_sinks(cfg, st.rank, st.world_size)  # --tensorboard-dir, --wandb-project
    for note in resolved.notes:  # defaults the run chose (warmup, evaluation cadence, derived batch)
        log.print(note)
    log.print(f"> host memory: {keep_freed_memory(cfg.engine.keep_host_memory, st.device.type)}")
    run = build_run(cfg, st, train_ds, valid_ds, log=log, resume=resume, extra_valid_ds=extra_ds)
    run.downstream = downstream_evaluator(cfg, st, tok, run.engine.precision)  # --eval-tasks
    _header(cfg, st, run)
    state = run.train()
    run.close()
    _summary(state, log)
    log.close()
    return state


def _header(cfg: Config, st: pstate.ParallelState, run) -> None:
    # ZeRO-3 leaves each rank an empty placeholder per parameter; ds_numel is the parameter's full size.
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in run.engine.module.parameters())
    run.log.print(f"> model {cfg.model.family}: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
                  f"{n_params / 1e6:.2f}M parameters on this rank; TP={st.tp} PP={st.pp} DP={st.dp}; "
                  f"EST schedule: {describe_schedule(cfg.est, run.sampler.schedule)}; "
                  f"unsampled parameters: {cfg.est.unsampled_update}")


def _summary(state: TrainState, log: MetricsLog) -> None:
    train_recs = [r for r in state.history if "lm_loss" in r]
    val_recs = [r for r in state.history if "val_loss" in r]
    saved = 1.0 - state.cumulative_flops / max(1, state.full_cumulative_flops)
    train_loss = train_recs[-1]["lm_loss"] if train_recs else float("nan")
    val_loss = val_recs[-1]["val_loss"] if val_recs else float("nan")  # nan: stopped before any evaluation
    log.print("=" * 100)
    log.print(f" done: {state.iteration} iterations | final train loss: {train_loss:.4f} | "
              f"final validation loss: {val_loss:.4f} | "
              f"training FLOPs: {state.cumulative_flops:.3e} vs full model {state.full_cumulative_flops:.3e} "
              f"({100 * saved:.1f}% saved)")
    log.print("=" * 100)


def main(argv: Optional[list[str]] = None, default_preset: str = "gpt2-tiny",
         description: str = "Pretrain a language model with Evolving Subnetwork Training") -> TrainState:
    try:
        cfg = parse_args(argv, description, default_preset)
        quiet_third_party(cfg.train.verbose)
        if cfg.train.dry_run:  # plan only (planning/dry_run.py): a bad plan raises ConfigError, one line below
            from megatron_est.planning.dry_run import dry_run

            sys.exit(dry_run(cfg))
        _, world, _ = pstate.env_rank_and_world()
        validate(cfg, world)
        precheck_load(cfg)  # a --load without any checkpoint: refused before data or process groups
    except ConfigError as e:
        fail(str(e))
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)
    par = cfg.parallel
    try:
        st = pstate.initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                               par.distributed_backend, par.distributed_timeout_minutes,
                               single_process_group=cfg.engine.deepspeed)  # DeepSpeed needs a group
        state = run(cfg, st)
    except (KeyboardInterrupt, SystemExit):
        pstate.abort()
        raise
    except Exception as e:  # no barrier now: a failed rank's peers must not wait for it (srun, torchrun act)
        pstate.abort()
        crash(e)
    pstate.destroy()
    return state
