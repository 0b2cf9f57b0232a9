"""Checkpoint layout (Megatron's directory names, latest pointer, metadata) and the checks made before --load.

Pure file reads and name arithmetic, the same on every rank; see checkpointing.py for saving and loading.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional

import torch.distributed as dist

from megatron_est.config import Config, ConfigError
from megatron_est.parallel.layout import Layout
from megatron_est.parallel.state import ParallelState, env_rank_and_world
from megatron_est.training import checkpoint_manifest as manifest

CHECKPOINT_VERSION = 1
LATEST_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "metadata.json"
SHARD_FILE = "model_optim_rng.pt"
_TMP_PREFIX = ".tmp."
_OLD_PREFIX = ".old."

# Model fields that must match the checkpoint's, with the flag that sets each.
_SHAPE_FIELDS = {"family": "--model-family", "num_layers": "--num-layers", "hidden_size": "--hidden-size",
                 "num_attention_heads": "--num-attention-heads", "num_query_groups": "--num-query-groups",
                 "ffn_hidden_size": "--ffn-hidden-size", "vocab_size": "--vocab-size (the tokenizer)",
                 "make_vocab_size_divisible_by": "--make-vocab-size-divisible-by",
                 "max_position_embeddings": "--max-position-embeddings", "normalization": "--normalization",
                 "activation": "--activation", "position_embedding": "--position-embedding",
                 "add_bias": "--add-bias", "tie_embeddings": "--tie-embeddings",
                 # not shapes, but a different value silently changes the function the weights compute
                 "norm_epsilon": "--norm-epsilon", "rotary_base": "--rotary-base"}


# ---------------------------------------------------------------------------------------------- names
def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def shard_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def shard_path(root: str, iteration: int, tp_rank: int, pp_rank: int, pp: int) -> str:
    return os.path.join(root, iter_dir_name(iteration), shard_dir_name(tp_rank, pp_rank, pp), SHARD_FILE)


def est_state_path(root: str, iteration: int, tp_rank: int, pp_rank: int, pp: int) -> str:
    """Our extra state next to a DeepSpeed checkpoint."""
    return os.path.join(root, iter_dir_name(iteration), f"est_state_{shard_dir_name(tp_rank, pp_rank, pp)}.pt")


def read_latest_iteration(root: str) -> Optional[int]:
    """The iteration the latest pointer names, or None when there is no pointer."""
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--load {root}: {LATEST_FILE} holds {text!r}, not an iteration number") from None


def read_metadata(root: str, iteration: int) -> dict:
    path = os.path.join(root, iter_dir_name(iteration), METADATA_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--load {root}: {LATEST_FILE} names iteration {iteration} but {path} is missing "
                          "(incomplete or foreign checkpoint)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--load {root}: {path} is not valid JSON ({e.msg})") from None


# -------------------------------------------------------------------------------------- what we check
def config_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _parallel_layout(cfg: Config) -> dict:
    par = dataclasses.asdict(cfg.parallel)
    for k in ("data_parallel_size", "distributed_backend"):
        par.pop(k, None)
    return par


def _metadata(cfg: Config, st: ParallelState, iteration: int, gbs: int, engine: str) -> dict:
    return {"format": "megatron_est", "checkpoint_version": CHECKPOINT_VERSION, "engine": engine,
            "iteration": iteration, "consumed_samples": iteration * gbs, "global_batch_size": gbs,
            "model": dataclasses.asdict(cfg.model), "parallel": {**_parallel_layout(cfg), "data_parallel_size": st.dp},
            "zero_stage": _zero_stage(cfg) if engine == "deepspeed" else None,
            "precision": cfg.engine.precision, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _zero_stage(cfg: Config) -> Optional[int]:
    return getattr(cfg.engine, "resolved_zero_stage", None) or cfg.engine.zero_stage


def resolve_load(cfg: Config) -> Optional[tuple[str, int]]:
    """(directory, iteration) to resume from, None to start fresh; refuses a missing or mismatched checkpoint.

    The checkpoint the latest pointer names is verified against its manifest; a damaged or incomplete one is
    reported (path and cause) and the newest intact checkpoint by save order is loaded instead, in one line.
    File reads only, the same on every rank: call it on every rank (under torch.distributed the checksums are
    shared out, a collective) before building anything. --load equal to --save with no checkpoint yet is a
    fresh start (the auto-resume pattern of preemptible jobs); any other --load that holds no checkpoint is
    refused.
    """
    ck = cfg.checkpoint
    if not ck.load:
        return None
    root = ck.load
    same_as_save = ck.save is not None and os.path.abspath(ck.save) == os.path.abspath(root)
    if not os.path.isdir(root) or not os.path.isfile(os.path.join(root, LATEST_FILE)):
        if same_as_save:
            return None
        what = "does not exist" if not os.path.isdir(root) else f"holds no {LATEST_FILE}"
        raise ConfigError(f"--load {root}: {what} (no checkpoint to load)")
    iteration = newest_intact(root)
    check_compatible(cfg, read_metadata(root, iteration), root)
    return root, iteration


def newest_intact(root: str) -> int:
    """The iteration to load: the latest pointer's when its checkpoint is intact, else the newest intact one by
    save order (said in one line on rank 0); one line and ConfigError when none is intact."""
    try:
        latest, problems = read_latest_iteration(root), []
    except ConfigError as e:
        latest, problems = None, [str(e).removeprefix(f"--load {root}: ")]
    candidates = ([latest] if latest is not None else []) + [i for i in reversed(save_order(root)) if i != latest]
    for it in candidates:
        status, problem = _inspect(root, it)
        if status == "damaged":
            problems.append(problem)
            continue
        if problems:
            _note(f"--load {root}: {problems[0]}; falling back to iteration {it}, the newest intact checkpoint"
                  + (f" ({len(problems) - 1} more damaged)" if len(problems) > 1 else ""))
        if status == "unverified":
            _note(f"--load {root}: iteration {it} has no {manifest.MANIFEST_FILE} (saved before checkpoints had "
                  "one): loading it unverified")
        return it
    more = f" (and {len(problems) - 1} more damaged)" if len(problems) > 1 else ""
    raise ConfigError(f"--load {root}: no intact checkpoint: {problems[0] if problems else 'none found'}{more}")


def _inspect(root: str, iteration: int) -> tuple[str, Optional[str]]:
    """checkpoint_manifest.verify of one iteration directory, after checking it exists and has metadata."""
    directory = os.path.join(root, iter_dir_name(iteration))
    if not os.path.isdir(directory):
        return "damaged", f"{LATEST_FILE} names iteration {iteration} but {directory} is missing"
    try:
        read_metadata(root, iteration)
    except ConfigError as e:
        return "damaged", str(e).removeprefix(f"--load {root}: ")
    return manifest.verify(directory)


def _note(msg: str) -> None:
    """A warning line on rank 0's stderr (every rank reaches the same conclusion)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else env_rank_and_world()[0]
    if rank == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ save order, pruning
def iteration_dirs(root: str) -> list[int]:
    """Iterations of the complete checkpoint directories (iter_XXXXXXX/) under root, in no particular order."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return [int(d[5:]) for d in names if d.startswith("iter_") and d[5:].isdigit()
            and os.path.isdir(os.path.join(root, d))]


def _save_key(root: str, iteration: int) -> tuple:
    """Sort key by save time: the manifest's save counter, then the file time (checkpoints without a manifest
    count as older than any with one), then the iteration."""
    directory = os.path.join(root, iter_dir_name(iteration))
    meta = os.path.join(directory, METADATA_FILE)
    try:
        mtime = os.path.getmtime(meta if os.path.exists(meta) else directory)
    except OSError:
        mtime = 0.0
    return manifest.save_seq(directory), mtime, iteration


def save_order(root: str) -> list[int]:
    """Checkpoint iterations under root, oldest save first."""
    return sorted(iteration_dirs(root), key=lambda it: _save_key(root, it))


def next_save_seq(root: str) -> int:
    return 1 + max((manifest.save_seq(os.path.join(root, iter_dir_name(i))) for i in iteration_dirs(root)),
                   default=0)


def prune_list(root: str, keep: int) -> list[str]:
    """Checkpoint directories --keep-last `keep` deletes: all but the newest `keep` saves, never the one the
    latest pointer names (whatever their iteration numbers: a restart into a folder holding higher ones)."""
    try:
        latest = read_latest_iteration(root)
    except ConfigError:
        latest = None
    order = save_order(root)
    old = order[:-keep] if keep > 0 else order
    return [os.path.join(root, iter_dir_name(it)) for it in old if it != latest]


def precheck_load(cfg: Config) -> None:
    """The part of resolve_load that needs no tokenizer: refuse a --load that holds no checkpoint at all."""
    ck = cfg.checkpoint
    if not ck.load:
        return
    same_as_save = ck.save is not None and os.path.abspath(ck.save) == os.path.abspath(ck.load)
    if not same_as_save and (not os.path.isdir(ck.load) or read_latest_iteration(ck.load) is None):
        what = "does not exist" if not os.path.isdir(ck.load) else f"holds no {LATEST_FILE}"
        raise ConfigError(f"--load {ck.load}: {what} (no checkpoint to load)")


def check_compatible(cfg: Config, meta: dict, root: str) -> None:
    """One line naming the first difference in model shape, parallel layout or engine."""
    if meta.get("format") != "megatron_est":
        raise ConfigError(f"--load {root}: not a megatron_est checkpoint (metadata format {meta.get('format')!r})")
    missing = [k for k in ("model", "parallel") if not isinstance(meta.get(k), dict)]
    if missing:
        raise ConfigError(f"--load {root}: metadata.json of iteration {meta.get('iteration', '?')} has no "
                          f"'{missing[0]}' section (incomplete or foreign checkpoint)")
    saved_model, ours = meta["model"], dataclasses.asdict(cfg.model)
    for key, flag in _SHAPE_FIELDS.items():
        if key in saved_model and saved_model[key] != ours.get(key):
            raise ConfigError(f"--load {root}: checkpoint has {flag} {saved_model[key]}, this run "
                              f"{ours.get(key)} (model differs)")
    saved_par = meta["parallel"]
    for key, value in _parallel_layout(cfg).items():
        if key in saved_par and saved_par[key] != value:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"--load {root}: checkpoint was saved with {flag} {saved_par[key]}, this run uses "
                              f"{value} (merge or re-shard it with tools/convert_checkpoint.py)")
    engine = "deepspeed" if cfg.engine.deepspeed else "torch"
    saved_engine = meta.get("engine", "torch")
    if saved_engine != engine and not (saved_engine == "torch" and meta.get("weights_only")):
        raise ConfigError(f"--load {root}: checkpoint was written by the {saved_engine} engine, this run uses the "
                          f"{engine} engine (export it with tools/convert_checkpoint.py and import it)")
    if engine == "deepspeed" and not meta.get("weights_only"):
        if meta.get("parallel", {}).get("data_parallel_size") != _current_layout(cfg).dp:
            raise ConfigError(f"--load {root}: DeepSpeed ZeRO checkpoint saved at data-parallel size "
                              f"{meta['parallel'].get('data_parallel_size')}, this run has {_current_layout(cfg).dp}")
    gbs = meta.get("global_batch_size")
    ours_gbs = _current_layout(cfg).global_batch(cfg.train)
    if gbs is not None and gbs != ours_gbs and not cfg.checkpoint.finetune and not meta.get("weights_only"):
        raise ConfigError(f"--load {root}: checkpoint was trained with --global-batch-size {gbs}, this run uses "
                          f"{ours_gbs} (the data position would not resume; use --finetune to restart)")


def _current_layout(cfg: Config) -> Layout:
    """This run's layout, from the process group when it exists, else from the launcher's environment."""
    par = cfg.parallel
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else env_rank_and_world()[1]
    return Layout.of(world, par.tensor_model_parallel_size, par.pipeline_model_parallel_size)
