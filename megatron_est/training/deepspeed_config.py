"""The DeepSpeed JSON of a run: the user's file as is (checked against our flags), or one derived from our flags.

Nothing here imports deepspeed, so every check runs up front, before process groups, models or files exist.

- Batch sizes: train_batch_size, train_micro_batch_size_per_gpu and gradient_accumulation_steps must agree with
  --global-batch-size, --micro-batch-size and the data-parallel size; missing or "auto" keys are filled in.
- ZeRO stage: zero_optimization.stage of the JSON (DeepSpeed's default 0 when absent), else --zero-stage
  (default 1). With pipeline parallelism only stages 0 and 1 are accepted, as in Megatron-DeepSpeed.
- Precision: the JSON's bf16/fp16 sections, else --bf16/--fp16; a contradiction is refused. DeepSpeed refuses
  fp16 without a GPU, so --fp16 is refused up front there.
- Optimizer: the JSON's optimizer section when present (DeepSpeed builds it), else our torch AdamW (with
  Megatron's weight-decay groups) as DeepSpeed's client optimizer. Gradient clipping from --clip-grad unless the
  JSON sets gradient_clipping. Optimizer-state offload: the JSON's zero_optimization.offload_optimizer, or
  --offload-optimizer for a derived config.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
from typing import Optional

import torch

from megatron_est.config import Config, ConfigError
from megatron_est.parallel.layout import Layout

DERIVED_FILE = "deepspeed_config.json"


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def read_user_json(path: str) -> dict:
    flag = "--deepspeed_config"
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e.strerror})") from None
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(conf, dict):
        raise ConfigError(f"{flag} {path}: the top level must be a JSON object")
    _check_shape(conf, f"{flag} {path}")
    return conf


# Sections DeepSpeed reads as objects: a scalar there fails deep inside deepspeed.initialize with an AttributeError.
_OBJECTS = ("zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "data_types", "activation_checkpointing")
_ZERO_OBJECTS = ("offload_optimizer", "offload_param")


def _check_shape(conf: dict, where: str) -> None:
    for key in _OBJECTS:
        if key in conf and not isinstance(conf[key], dict):
            raise ConfigError(f"{where}: {key} must be a JSON object, got {conf[key]!r}")
    for key in _ZERO_OBJECTS:
        value = conf.get("zero_optimization", {}).get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: zero_optimization.{key} must be a JSON object, got {value!r}")
    clip = conf.get("gradient_clipping")
    if not _is_auto(clip) and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
        raise ConfigError(f"{where}: gradient_clipping must be a number >= 0 or \"auto\", got {clip!r}")


def _is_auto(v) -> bool:
    return v is None or v == "auto"


def _section(conf: dict, key: str) -> dict:
    """A section of the JSON that must be an object (DeepSpeed would fail deep inside with an AttributeError)."""
    value = conf.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"--deepspeed_config: {key} must be a JSON object, got {value!r}")
    return value


def _stage_of(conf: dict) -> int:
    zero = _section(conf, "zero_optimization")
    stage = zero.get("stage", 0)
    if not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"--deepspeed_config: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def resolve_config(cfg: Config, tp: int, pp: int, dp: int) -> dict:
    """The DeepSpeed config dict this run hands to deepspeed.initialize (refusing contradictions)."""
    e, tr = cfg.engine, cfg.train
    mbs = tr.micro_batch_size
    layout = Layout(tp=tp, dp=dp, pp=pp)
    gbs = layout.global_batch(tr)
    gas = layout.micro_batches(tr)
    path = e.deepspeed_config
    conf = copy.deepcopy(read_user_json(path)) if path else {}
    src = f"--deepspeed_config {path}" if path else "derived config"
    ours = {"train_batch_size": (gbs, f"--global-batch-size {gbs}"),
            "train_micro_batch_size_per_gpu": (mbs, f"--micro-batch-size {mbs}"),
            "gradient_accumulation_steps": (gas, f"gradient accumulation {gas} (= --global-batch-size {gbs} / "
                                                 f"(--micro-batch-size {mbs} x data-parallel size {dp}))")}
    for key, (value, said) in ours.items():
        theirs = conf.get(key)
        if _is_auto(theirs):
            conf[key] = value
        elif theirs != value:
            raise ConfigError(f"{src}: {key} {theirs!r} disagrees with {said}; make them agree")
    # ZeRO stage
    if path:
        stage = _stage_of(conf)
        if e.zero_stage is not None and e.zero_stage != stage:
            raise ConfigError(f"{src}: zero_optimization.stage {stage} disagrees with --zero-stage {e.zero_stage}")
    else:
        stage = 1 if e.zero_stage is None else e.zero_stage  # --zero-stage's range: config.check_fields
        conf["zero_optimization"] = {"stage": stage}
    zero = conf.setdefault("zero_optimization", {"stage": stage})
    if pp > 1 and stage != 1:
        raise ConfigError(f"ZeRO stage {stage} with --pipeline-model-parallel-size {pp}: with pipeline "
                          "parallelism DeepSpeed supports ZeRO-1 only (use --zero-stage 1, as Megatron-DeepSpeed does)")
    if e.offload_optimizer:
        if path and "offload_optimizer" not in zero:
            raise ConfigError(f"{src}: --offload-optimizer with a JSON: set zero_optimization.offload_optimizer "
                              "in the file instead")
        if stage == 0:
            raise ConfigError("--offload-optimizer needs --zero-stage 1, 2 or 3")
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": torch.cuda.is_available()})
    # Precision
    json_bf16 = _section(conf, "bf16").get("enabled", False) is True
    json_fp16 = _section(conf, "fp16").get("enabled", False) is True
    if json_bf16 and json_fp16:
        raise ConfigError(f"{src}: enables both bf16 and fp16")
    if (json_bf16 and e.fp16) or (json_fp16 and e.bf16):
        raise ConfigError(f"{src}: enables {'bf16' if json_bf16 else 'fp16'} but the run asked for "
                          f"{'--fp16' if e.fp16 else '--bf16'}")
    bf16, fp16 = json_bf16 or e.bf16, json_fp16 or e.fp16
    if bf16:
        conf.setdefault("bf16", {})["enabled"] = True
    if fp16:
        section = conf.setdefault("fp16", {})
        section["enabled"] = True
        if not path:
            section.update({"loss_scale": 0 if e.loss_scale is None else e.loss_scale,
                            "initial_scale_power": int(round(torch.log2(torch.tensor(e.initial_loss_scale)).item())),
                            "loss_scale_window": e.loss_scale_window, "hysteresis": e.hysteresis,
                            "min_loss_scale": e.min_loss_scale})
        if not torch.cuda.is_available():
            raise ConfigError("--fp16 under --deepspeed needs a GPU (DeepSpeed refuses fp16 on CPU); use --bf16")
    if pp > 1 and bf16:
        _refuse_bf16_optimizer(conf, src, pp)
    # Clipping, client optimizer, quiet logging
    if _is_auto(conf.get("gradient_clipping")):
        conf["gradient_clipping"] = tr.clip_grad
    if "optimizer" not in conf:
        conf.setdefault("zero_allow_untested_optimizer", True)
        if zero.get("offload_optimizer"):
            conf.setdefault("zero_force_ds_cpu_optimizer", False)  # accept our torch AdamW on offloaded state
    conf.setdefault("steps_per_print", 10 ** 9)
    conf.setdefault("wall_clock_breakdown", False)
    return conf


FP32_NAMES = ("fp32", "float32", "float", "torch.float32")


def _refuse_bf16_optimizer(conf: dict, src: str, pp: int) -> None:
    """bf16 + ZeRO-1 + data_types.grad_accum_dtype fp32 (without offload) selects DeepSpeed's BF16_Optimizer,
    which folds each backward into its fp32 buffer only from engine.backward or DeepSpeed's own pipeline engine;
    our stages' tensor.backward(grad) leaves it empty and engine.step() fails ("stack expects a non-empty
    TensorList"). Refused up front; without the key DeepSpeed accumulates gradients in bf16."""
    accum = str(_section(conf, "data_types").get("grad_accum_dtype", "")).lower()
    offload = (_section(conf, "zero_optimization").get("offload_optimizer") or {}).get("device", "none")
    if accum in FP32_NAMES and offload in ("none", None):
        raise ConfigError(f"{src}: data_types.grad_accum_dtype {accum} with bf16 and --pipeline-model-parallel-size "
                          f"{pp} is not supported (DeepSpeed's BF16_Optimizer needs its own pipeline engine); "
                          "remove the key (gradients then accumulate in bf16)")


def check_deepspeed(cfg: Config, tp: int, pp: int, dp: int) -> tuple[str, int]:
    """Up-front refusals for --deepspeed (training/checks.py); returns (precision, ZeRO stage) as the flags and
    the JSON decide them together (the JSON decides when it enables a precision). The config is not changed."""
    if not deepspeed_installed():
        raise ConfigError("--deepspeed: DeepSpeed is not installed (pip install deepspeed, or drop --deepspeed "
                          "to use the plain torch engine)")
    conf = resolve_config(cfg, tp, pp, dp)
    if cfg.est.lr_rewarm_iters and "scheduler" in conf:  # its scheduler sets the LR, not training/optimizer.step_lr
        raise ConfigError(f"--est-lr-rewarm-iters with --deepspeed_config {cfg.engine.deepspeed_config}: its "
                          "\"scheduler\" sets the learning rate; drop one of them")
    precision = "bf16" if (conf.get("bf16") or {}).get("enabled") else \
        "fp16" if (conf.get("fp16") or {}).get("enabled") else "fp32"
    return precision, _stage_of(conf)


def write_derived(conf: dict, cfg: Config) -> Optional[str]:
    """Write a derived config next to the run (the --save directory, else beside --metrics-file) for tuning."""
    if cfg.engine.deepspeed_config:
        return None
    where = cfg.checkpoint.save or (os.path.dirname(os.path.abspath(cfg.train.metrics_file))
                                    if cfg.train.metrics_file else None)
    if where is None:
        return None
    os.makedirs(where, exist_ok=True)
    path = os.path.join(where, DERIVED_FILE)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(conf, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path
