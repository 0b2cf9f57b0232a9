"""Up-front refusal of invalid flag combinations: one line naming the flag, before any process group, model
or file exists. The one top-level validation step; it imports downward only (config, est, parallel, and the
DeepSpeed JSON checks, which never import deepspeed), so no package imports it back.
"""
from __future__ import annotations

from megatron_est.config import Config, ConfigError
from megatron_est.est.fit import check_target
from megatron_est.est.schedule import parse_schedule
from megatron_est.parallel.layout import Layout
from megatron_est.parallel.partition import is_even, stage_ranges
from megatron_est.training.deepspeed_config import check_deepspeed


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config, world_size: int) -> None:
    """Refuse invalid combinations up front (before any process group exists), one line naming the flags."""
    m, par, tr, est = cfg.model, cfg.parallel, cfg.train, cfg.est
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    _require(par.distributed_timeout_minutes > 0, "--distributed-timeout-minutes must be > 0")
    _require(par.world_size is None or par.world_size == world_size,
             f"--world-size {par.world_size} disagrees with the launcher's world size {world_size}")
    layout = Layout.of(world_size, tp, pp)  # refuses sizes < 1 and a world that does not split
    dp = layout.dp
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}")
    _require(m.num_attention_heads % m.num_query_groups == 0,
             f"--num-attention-heads {m.num_attention_heads} is not divisible by --num-query-groups "
             f"{m.num_query_groups}")
    _require(m.num_attention_heads % tp == 0,
             f"--num-attention-heads {m.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}")
    _require(m.num_query_groups % tp == 0,
             f"--num-query-groups {m.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}")
    _require(m.ffn_hidden_size % tp == 0,
             f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    _require(m.padded_vocab_size % tp == 0,
             f"padded vocabulary {m.padded_vocab_size} is not divisible by --tensor-model-parallel-size {tp} "
             "(raise --make-vocab-size-divisible-by)")
    stage_ranges(cfg)  # refuses a layer count that does not split over the stages
    _require(m.seq_length <= m.max_position_embeddings,
             f"--seq-length {m.seq_length} exceeds --max-position-embeddings {m.max_position_embeddings}")
    _require(m.position_embedding != "rope" or m.head_dim % 2 == 0, "rotary embeddings need an even head size")
    gbs = layout.global_batch(tr)
    _require(tr.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
    _require(gbs % (tr.micro_batch_size * dp) == 0,
             f"--global-batch-size {gbs} is not divisible by --micro-batch-size {tr.micro_batch_size} x "
             f"data-parallel size {dp}")
    _require(tr.train_iters >= 1, "--train-iters must be >= 1")
    _require(tr.lr > 0 and 0 <= tr.min_lr <= tr.lr, "--lr must be > 0 and --min-lr in [0, --lr]")
    _require(tr.lr_decay_style in ("cosine", "linear", "constant"),
             f"--lr-decay-style: unknown style {tr.lr_decay_style!r} (cosine, linear, constant)")
    _require(tr.eval_interval >= 1 and tr.log_interval >= 1, "--eval-interval and --log-interval must be >= 1")
    _validate_strata(cfg, tp, pp)
    _require(est.unsampled_update in ("freeze", "adamw"),
             f"--est-unsampled-update: unknown value {est.unsampled_update!r} (freeze or adamw; freeze, the default, "
             "is the same algorithm in every engine and layout)")
    _validate_engine(cfg, tp, pp, dp)
    schedule = parse_schedule(est.schedule, tr.train_iters)
    if est.target_saving is not None:  # the FLOPs fit itself waits for the tokenizer's vocabulary (build_sampler)
        check_target(est.target_saving, schedule)


def _validate_strata(cfg: Config, tp: int, pp: int) -> None:
    m, est = cfg.model, cfg.est
    hs = est.tp_strata or tp
    _require(hs % tp == 0, f"--est-tp-strata {hs} must be a multiple of --tensor-model-parallel-size {tp}")
    _require(m.ffn_hidden_size % hs == 0, f"--est-tp-strata {hs} does not divide --ffn-hidden-size")
    _require(m.queries_per_group > 1 or m.num_attention_heads % hs == 0,
             f"--est-tp-strata {hs} does not divide --num-attention-heads {m.num_attention_heads}")
    if not is_even(stage_ranges(cfg)):  # uneven stages: the layer strata are the stages themselves
        _require(est.pp_strata in (None, pp), f"--est-pp-strata {est.pp_strata} must be unset (or {pp}) with "
                 "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers")
        return
    ls = est.pp_strata or pp
    _require(ls % pp == 0 and m.num_layers % ls == 0,
             f"--est-pp-strata {ls} must be a multiple of --pipeline-model-parallel-size {pp} and divide "
             f"--num-layers {m.num_layers}")


def _validate_engine(cfg: Config, tp: int, pp: int, dp: int) -> None:
    """Precision, recompute, checkpoint and DeepSpeed flags (the DeepSpeed JSON is read and checked here too)."""
    e, ck = cfg.engine, cfg.checkpoint
    _require(not (e.bf16 and e.fp16), "--bf16 and --fp16 are mutually exclusive")
    _require(e.recompute_granularity in (None, "full", "selective"),
             f"--recompute-granularity: unknown value {e.recompute_granularity!r} (full or selective)")
    _require(e.recompute_num_layers is None or (e.recompute_granularity == "full" and e.recompute_num_layers >= 1),
             "--recompute-num-layers needs --recompute-granularity full and a value >= 1")
    _require(e.initial_loss_scale > 0 and e.min_loss_scale > 0 and e.loss_scale_window >= 1 and e.hysteresis >= 1,
             "--initial-loss-scale, --min-loss-scale must be > 0 and --loss-scale-window, --hysteresis >= 1")
    for flag, value in (("--save-interval", ck.save_interval), ("--keep-last", ck.keep_last),
                        ("--exit-interval", ck.exit_interval)):
        _require(value is None or value >= 1, f"{flag} must be >= 1")
    _require(ck.save_interval is None or ck.save, "--save-interval needs --save")
    _require(not ck.exit_signal_handler or ck.save, "--exit-signal-handler needs --save (where to save on exit)")
    if not e.deepspeed:
        _require(e.zero_stage is None and not e.offload_optimizer,
                 "--zero-stage and --offload-optimizer need --deepspeed")
        return
    check_deepspeed(cfg, tp, pp, dp)
