"""EST's own refusals: sampling strata that do not divide what they split, the unsampled-update policy, and the
schedule against --train-iters. Returns the parsed schedule."""
from __future__ import annotations

from megatron_est.config import Config, ConfigError
from megatron_est.est.build import layer_strata
from megatron_est.est.fit import check_target
from megatron_est.est.sampler import end_layers, forced_conflict
from megatron_est.est.schedule import Schedule, is_smooth, parse_schedule

UNSAMPLED_UPDATES = ("freeze", "adamw")


def check_est(cfg: Config) -> Schedule:
    est = cfg.est
    _check_strata(cfg)
    if est.unsampled_update not in UNSAMPLED_UPDATES:
        raise ConfigError(f"--est-unsampled-update: unknown value {est.unsampled_update!r} (freeze or adamw; "
                          "either is the same algorithm in every engine and layout)")
    schedule = parse_schedule(est.schedule, cfg.train.train_iters)
    if est.target_saving is not None:  # the FLOPs fit itself waits for the tokenizer's vocabulary (build_sampler)
        check_target(est.target_saving, schedule)
    if est.keep_end_layers:
        _check_end_layers(cfg, schedule)
    if est.lr_rewarm_iters and is_smooth(est.schedule):
        raise ConfigError("--est-lr-rewarm-iters needs a staged --est-schedule: a smooth schedule switches "
                          "stage every iteration, so the learning rate would never come back")
    return schedule


def _check_end_layers(cfg: Config, schedule: Schedule) -> None:
    """Every layer stratum must be able to keep the end layers it holds, at every layer-sampling rate."""
    n = cfg.model.num_layers
    ranges = layer_strata(cfg) if cfg.est.stratified else ((0, n),)
    for p in sorted({st.p_layers for st in schedule.stages if st.p_layers < 1.0}):
        problem = forced_conflict(ranges, end_layers(n), p)
        if problem is not None:
            raise ConfigError(f"--est-keep-end-layers: {problem} (raise p_L, or use more layer strata: "
                              "--est-pp-strata)")


def _check_strata(cfg: Config) -> None:
    """Strata need only divide what they split: they are not tied to the layout (est/build.py)."""
    m, est = cfg.model, cfg.est
    hs = est.tp_strata
    if m.ffn_hidden_size % hs:
        raise ConfigError(f"--est-tp-strata {hs} does not divide --ffn-hidden-size {m.ffn_hidden_size}")
    if m.queries_per_group == 1 and m.num_attention_heads % hs:
        raise ConfigError(f"--est-tp-strata {hs} does not divide --num-attention-heads {m.num_attention_heads}")
    if m.num_layers % est.pp_strata:
        raise ConfigError(f"--est-pp-strata {est.pp_strata} must divide --num-layers {m.num_layers}")
