"""Loading checkpoints without running code, DeepSpeed's included.

Our own files load with torch.load(weights_only=True). DeepSpeed's loaders (its engine's checkpoint engine and
zero_to_fp32) call torch.load(weights_only=False): a crafted pickle in a DeepSpeed checkpoint would run code. So
before handing a DeepSpeed checkpoint over, every .pt file in it is opened with torch's weights-only unpickler,
allowing only the few DeepSpeed classes DeepSpeed itself writes (found by writing ZeRO 0-3, bf16, CPU offload
and pipeline checkpoints and listing torch.serialization.get_unsafe_globals_in_checkpoint). Anything else is
refused in one line naming the file and the type. The check maps the file (mmap=True): tensors are not read
into memory, only the pickle is run, by the weights-only unpickler.
"""
from __future__ import annotations

import glob
import os
import pickle

import torch

from megatron_est.config import ConfigError

# module, class: the only non-torch types in DeepSpeed 0.19's checkpoints (optimizer-state files).
DEEPSPEED_TYPES = (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                   ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                   ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                   ("deepspeed.utils.tensor_fragment", "fragment_address"))


def deepspeed_types() -> list:
    """The classes of DEEPSPEED_TYPES. Imports DeepSpeed: call on DeepSpeed paths only, after
    deepspeed_engine.import_deepspeed (not imported here: deepspeed_engine calls this module)."""
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_TYPES]


def check_file(path: str, allowed: list) -> None:
    """Unpickle `path` with torch's weights-only unpickler (plus `allowed` classes); ConfigError if it holds
    anything else. Nothing in the file runs."""
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) files cannot be mapped: read them
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(f"--load: refusing {path}: it holds {_unsafe_names(path, allowed)}, which a checkpoint "
                          "never contains (only tensors, plain values and DeepSpeed's own state); not loaded, "
                          "nothing in it was run") from None
    except (RuntimeError, EOFError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--load: cannot read {path} ({first})") from None


def _unsafe_names(path: str, allowed: list) -> str:
    names = {f"{c.__module__}.{c.__qualname__}" for c in allowed}
    try:
        found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in names]
    except Exception:  # noqa: BLE001 (only for the message)
        found = []
    return ", ".join(found[:3]) if found else "a type outside the allowed list"


def check_deepspeed_checkpoint(directory: str) -> None:
    """Every .pt file of a DeepSpeed checkpoint directory (iter_XXXXXXX/), before DeepSpeed unpickles any."""
    files = sorted(glob.glob(os.path.join(directory, "**", "*.pt"), recursive=True))
    if not files:
        return
    allowed = deepspeed_types()
    for path in files:
        check_file(path, allowed)


def check_checkpoint(directory: str, meta: dict) -> None:
    """Before any load: a DeepSpeed-format checkpoint's files through the weights-only check (our own files are
    always read with weights_only=True)."""
    if meta.get("engine") == "deepspeed" and not meta.get("weights_only"):
        check_deepspeed_checkpoint(directory)
