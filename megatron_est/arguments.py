"""Command line built from the typed configs, with Megatron's flag names.

Every dataclass field becomes a flag (`num_layers` -> `--num-layers`; EST fields get an `--est-` prefix), with the
help text, --help group and range check the field declares in config.py (the one place they live). Flags default
to "not given", so a named model preset fills in what the user did not set.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import NoReturn, Optional

from megatron_est.config import (GROUPS, MODEL_PRESETS, NET, SECTIONS, CheckpointConfig, Config, DataConfig,
                                 EngineConfig, ESTConfig, ParallelConfig, TrainConfig, check_fields, flag_name,
                                 model_preset)

# Extra spellings users bring from elsewhere (DeepSpeed writes --deepspeed_config with an underscore).
_ALIASES = {("engine", "deepspeed_config"): ("deepspeed_config",)}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, like every other refusal (argparse would print the usage of ~100 flags first)."""
        self.exit(2, f"error: {message} (--help lists the flags)\n")


def _bare(tp):
    """X of Optional[X]."""
    if typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == []:
        return "not set"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _default_text(section: str, f: dataclasses.Field, preset: str) -> str:
    if section == "model" and f.name in MODEL_PRESETS[preset]:
        return f"{_show(MODEL_PRESETS[preset][f.name])}, from --model-preset {preset}"
    if f.metadata.get("default_text"):
        return f.metadata["default_text"]
    return _show(f.default)


def _arg_kwargs(section: str, f: dataclasses.Field, tp, flag: str, preset: str) -> dict:
    """add_argument keywords of one field: type or action, Megatron's metavar (NUM_LAYERS), help with default."""
    kw = {"dest": f"{section}.{f.name}",
          "help": f"{f.metadata.get('help', '')} (default: {_default_text(section, f, preset)})"}
    tp = _bare(tp)
    if tp is bool:  # negative by name (--no-load-optim): one spelling; else --tf32 / --no-tf32
        kw["action"] = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
        return kw
    kw["metavar"] = flag.upper().replace("-", "_")
    if tp is list or typing.get_origin(tp) is list:
        kw["nargs"] = "+"
    else:
        kw["type"] = tp
    return kw


def build_parser(description: str, default_preset: str) -> argparse.ArgumentParser:
    p = _Parser(description=description, argument_default=argparse.SUPPRESS)
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    groups[NET].add_argument("--model-preset", default=default_preset, metavar="MODEL_PRESET",
                             help=f"model preset ({', '.join(MODEL_PRESETS)}); other network-size flags override "
                                  f"it (default: {default_preset})")
    for section, cls, prefix in SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = flag_name(section, f.name, prefix)
            if flag is None:
                continue
            names = ["--" + flag] + ["--" + a for a in _ALIASES.get((section, f.name), ())]
            group = groups.get(f.metadata.get("group")) or groups.setdefault("", p.add_argument_group("other"))
            group.add_argument(*names, **_arg_kwargs(section, f, hints[f.name], flag, default_preset))
    return p


def config_from_args(ns: argparse.Namespace) -> Config:
    given: dict[str, dict] = {s: {} for s, _, _ in SECTIONS}
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            given[section][name] = value
    model = model_preset(ns.model_preset, **given["model"])
    cfg = Config(model=model, parallel=ParallelConfig(**given["parallel"]), est=ESTConfig(**given["est"]),
                 train=TrainConfig(**given["train"]), data=DataConfig(**given["data"]),
                 checkpoint=CheckpointConfig(**given["checkpoint"]), engine=EngineConfig(**given["engine"]))
    check_fields(cfg)  # each value where it is parsed; combinations are validation.validate's
    return cfg


def parse_args(argv: Optional[list[str]], description: str, default_preset: str) -> Config:
    return config_from_args(build_parser(description, default_preset).parse_args(argv))
