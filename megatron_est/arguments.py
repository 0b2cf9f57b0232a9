"""Command line built from the typed configs, with Megatron's flag names.

Every dataclass field becomes a flag (`num_layers` -> `--num-layers`; EST fields get an `--est-` prefix). Flags
default to "not given", so a named model preset fills in what the user did not set.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Optional

from megatron_est.config import (MODEL_PRESETS, CheckpointConfig, Config, DataConfig,
                                 EngineConfig, ESTConfig, ModelConfig, ParallelConfig, TrainConfig,
                                 model_preset)

_SECTIONS = (("model", ModelConfig, ""), ("parallel", ParallelConfig, ""), ("est", ESTConfig, "est-"),
             ("train", TrainConfig, ""), ("data", DataConfig, ""), ("checkpoint", CheckpointConfig, ""),
             ("engine", EngineConfig, ""))
# Extra spellings users bring from elsewhere (DeepSpeed writes --deepspeed_config with an underscore).
_ALIASES = {("engine", "deepspeed_config"): ("deepspeed_config",)}
# Megatron spells a few flags differently from our field names.
_FLAG_NAMES = {("model", "family"): "model-family", ("data", "cache_dir"): "data-cache-dir",
               ("parallel", "data_parallel_size"): None}  # None: derived, not a flag
_HELP = {
    ("est", "schedule"): "preset name, 'none', or 'START:pH,pM,pL;...' (START an iteration or a percentage "
                         "of --train-iters, e.g. '0:0.5,0.5,0.5;300:0.5,0.5,1;600:1,1,1')",
    ("est", "target_saving"): "training-FLOPs saving to reach, e.g. 0.25: scales every --est-schedule stage "
                              "start by one common factor so the saving (this model, sequence length and "
                              "--train-iters) is within 0.5 percentage points of it",
    ("est", "layer_rescale"): "scale active residual branches by N_L/k_L in layer-sampling stages",
    ("est", "unsampled_update"): "parameters outside the subnetwork: freeze (untouched, AdamW moments too), adamw "
                                 "(zero gradient, AdamW moves them); default freeze, the same in every engine and layout",
    ("est", "tp_strata"): "sampling strata for heads and neurons (default: the TP size)",
    ("est", "pp_strata"): "sampling strata for layers (default: the PP size)",
    ("parallel", "distributed_timeout_minutes"): "timeout of every collective, in minutes (default 10, as in "
                                                 "Megatron); also how long ranks wait for rank 0 to build the data "
                                                 "indices",
    ("data", "extra_valid_data_path"): "extra validation sets (dataset prefixes, all documents used), each "
                                       "evaluated and logged by name: e.g. a held-out domain",
    ("engine", "tf32"): "TF32 tensor cores for fp32 matmuls and convolutions on GPUs of compute capability >= 8 "
                        "(default on; --no-tf32 for full fp32 precision, e.g. to compare with a CPU run)",
}


def _arg_type(tp) -> tuple[object, dict]:
    """argparse keyword arguments for a (resolved) field type."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if tp is list or typing.get_origin(tp) is list:
        return None, {"nargs": "+"}
    return None, {"type": tp}


def build_parser(description: str, default_preset: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    p.add_argument("--model-preset", default=default_preset,
                   help=f"model preset ({', '.join(MODEL_PRESETS)}); other model flags override it")
    for section, cls, prefix in _SECTIONS:
        grp = p.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = _FLAG_NAMES.get((section, f.name), prefix + f.name.replace("_", "-"))
            if flag is None:
                continue
            _, kw = _arg_type(hints[f.name])
            names = ["--" + flag] + ["--" + a for a in _ALIASES.get((section, f.name), ())]
            grp.add_argument(*names, dest=f"{section}.{f.name}", help=_HELP.get((section, f.name)), **kw)
    return p


def config_from_args(ns: argparse.Namespace) -> Config:
    given: dict[str, dict] = {s: {} for s, _, _ in _SECTIONS}
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            given[section][name] = value
    model = model_preset(ns.model_preset, **given["model"])
    return Config(model=model, parallel=ParallelConfig(**given["parallel"]), est=ESTConfig(**given["est"]),
                  train=TrainConfig(**given["train"]), data=DataConfig(**given["data"]),
                  checkpoint=CheckpointConfig(**given["checkpoint"]), engine=EngineConfig(**given["engine"]))


def parse_args(argv: Optional[list[str]], description: str, default_preset: str) -> Config:
    return config_from_args(build_parser(description, default_preset).parse_args(argv))
