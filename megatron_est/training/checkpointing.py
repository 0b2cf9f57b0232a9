"""Checkpoints that resume exactly: Megatron's directory layout, atomic writes, a latest pointer, pruning.

Layout under --save (plain torch engine):

    latest_checkpointed_iteration.txt      the newest complete checkpoint's iteration (written last)
    iter_0000100/
        metadata.json                      model shape, parallel layout, engine: checked before --load
        mp_rank_00/model_optim_rng.pt      one file per tensor-parallel rank (PP=1) ...
        mp_rank_01_003/model_optim_rng.pt  ... or per (tensor, pipeline) rank when PP > 1

Under the DeepSpeed engine iter_XXXXXXX/ holds DeepSpeed's own files (engine.save_checkpoint with the tag
iter_XXXXXXX) plus our est_state_mp_rank_XX[_YYY].pt, and a DeepSpeed `latest` file is kept beside ours.

Each shard holds the model, the optimizer, the LR schedule, the iteration and consumed samples, the data
position, the fp16 loss scaler, and every rank's RNG streams (python, numpy, torch, the CUDA device in use)
gathered over the data-parallel group; the optimizer state is in torch AdamW's layout whichever AdamW ran.
The EST subnetwork of a step is a pure function of (seed, iteration), so restoring the iteration restores the
EST schedule.

Atomicity: every save goes to a hidden temporary directory that is renamed into place once all ranks have
written; its manifest.json (every file's size and CRC-32, checkpoint_manifest.py) is written last inside it, and
the latest pointer is replaced (write, fsync, rename) only after the rename. A process killed at any moment
therefore leaves the previous checkpoint and the pointer to it intact; leftovers of an interrupted save are
removed by the next save. A save that cannot write (disk full, a file-size limit, no permission) says so in one
line naming the path and the cause (every rank agrees on it in place of the barriers between the phases), removes
what it wrote, leaves the previous checkpoint and the pointer as they were, and stops the run, or lets it go on
with --save-failure continue. --keep-last keeps the newest saves by save order, never the pointer's checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_est.config import Config, ConfigError
from megatron_est.parallel.state import ParallelState
from megatron_est.training import checkpoint_manifest as manifest, safe_load
from megatron_est.training.checkpoint_layout import (CHECKPOINT_VERSION, LATEST_FILE, METADATA_FILE, _OLD_PREFIX,
                                                     _TMP_PREFIX, _metadata, config_dict, iter_dir_name,
                                                     next_save_seq, prune_list, read_latest_iteration,
                                                     read_metadata, shard_path)
from megatron_est.training.checkpoint_write_errors import (CheckpointSaveError, agree, is_io_failure,
                                                           remove_quietly, write_error)
from megatron_est.training.optimizer import learning_rate
from megatron_est.training.state import TrainState

# --------------------------------------------------------------------------------------------- atomic io


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_file(obj: Any, path: str) -> None:
    """torch.save to a temporary name in the same directory, fsync, rename (tests patch this to kill a save)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        remove_quietly(tmp)  # no partial file left behind
        if not is_io_failure(e):
            raise
        raise write_error(path, e) from e


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise write_error(path, e) from e
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


# ------------------------------------------------------------------------------------------------- RNG
# CUDA: only the generator of the device this process computes on is saved, with its index, and restored onto
# this process's current device, so a checkpoint resumes where a process sees fewer (or other) GPUs, or none.
# Checkpoints before this held torch.cuda.get_rng_state_all(), a list over every visible GPU.
def get_rng_state() -> dict:
    """Every RNG stream of this process, as tensors and plain Python values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"random": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(), "cuda": _get_cuda_rng()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if _cuda_in_use():  # a CPU run ignores a GPU run's CUDA state
        index = torch.cuda.current_device()
        cuda = cuda_rng_for_device(state.get("cuda"), index)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, index)


def _get_cuda_rng() -> Optional[dict]:
    """{"device": index, "state": ByteTensor} of the current CUDA device; None when CUDA is not in use."""
    if not _cuda_in_use():
        return None
    index = torch.cuda.current_device()
    return {"device": index, "state": torch.cuda.get_rng_state(index)}


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def cuda_rng_for_device(saved, index: int) -> Optional[torch.Tensor]:
    """The saved CUDA generator state to restore on device `index`: the one saved (whichever device it came
    from); from an old per-GPU list, the entry of the same index when there is one, else the first."""
    if saved is None:
        return None
    if isinstance(saved, dict):
        return saved["state"]
    if len(saved) == 0:
        return None
    return saved[index] if index < len(saved) else saved[0]


def _gather_rng(st: ParallelState) -> list:
    """RNG states of all data-parallel ranks of this (tensor, pipeline) position, indexed by dp rank."""
    mine = get_rng_state()
    if st.dp == 1:
        return [mine]
    out: list = [None] * st.dp
    dist.all_gather_object(out, mine, group=st.dp_group)
    return out


# ------------------------------------------------------------------------------------------ checkpointer
class Checkpointer:
    """Saves and loads this rank's part of a checkpoint; decides after each step whether to save or stop.

    What is common to every engine lives here (directory layout, atomic publication, pointer, pruning, the
    iteration, data position, FLOPs counters and RNG streams); the engine (training/engine.py) writes and reads its
    own files: model, optimizer and loss scaler.
    """

    def __init__(self, cfg: Config, st: ParallelState, engine, *, gbs: int, signal_handler=None, log=None):
        self.cfg, self.st, self.engine = cfg, st, engine
        self.gbs, self.log = gbs, log
        self.signal_handler = signal_handler
        self.last_saved: Optional[int] = None
        self.exit_reason: Optional[str] = None

    def close(self) -> None:
        if self.signal_handler is not None:
            self.signal_handler.restore()

    # ------------------------------------------------------------------------------------------- policy
    def after_step(self, state) -> bool:
        """Called on every rank after each step; returns True when training must stop now."""
        ck, it = self.cfg.checkpoint, state.iteration
        save = bool(ck.save_interval and it % ck.save_interval == 0) or it == self.cfg.train.train_iters
        stop = False
        if self.signal_handler is not None and self.signal_handler.any_received(self.st.device):
            save, stop, self.exit_reason = True, True, "exit signal"
        if ck.exit_interval and it % ck.exit_interval == 0 and it < self.cfg.train.train_iters:
            save, stop, self.exit_reason = True, True, f"--exit-interval {ck.exit_interval}"
        if save and ck.save and self.last_saved != it:
            self.save(state)
        if stop and self.log is not None:
            self.log.print(f" exiting at iteration {it} ({self.exit_reason})")
        return stop

    # --------------------------------------------------------------------------------------------- save
    def _payload(self, state) -> dict:
        cfg, st, it = self.cfg, self.st, state.iteration
        tr = cfg.train
        module = self.engine.module
        first = getattr(getattr(module, "decoder", None), "first", 0)
        n_local = len(getattr(getattr(module, "decoder", None), "layers", []))
        return {
            "checkpoint_version": CHECKPOINT_VERSION, "format": "megatron_est", "iteration": it,
            "consumed_samples": it * self.gbs, "args": config_dict(cfg),
            "opt_param_scheduler": {"num_steps": it, "lr": learning_rate(tr, max(0, it - 1)), "max_lr": tr.lr,
                                    "min_lr": tr.min_lr, "warmup_iters": tr.lr_warmup_iters,
                                    "decay_iters": tr.lr_decay_iters or tr.train_iters,
                                    "decay_style": tr.lr_decay_style},
            "data_loader": {"consumed_samples": it * self.gbs, "global_batch_size": self.gbs,
                            "micro_batch_size": tr.micro_batch_size, "next_step": it},
            "train_state": {"cumulative_flops": int(state.cumulative_flops),
                            "full_cumulative_flops": int(state.full_cumulative_flops),
                            "nonfinite_steps": int(state.nonfinite_steps)},
            "rng_state": _gather_rng(st),
            "parallel": {"tp": st.tp, "pp": st.pp, "dp": st.dp, "tp_rank": st.tp_rank, "pp_rank": st.pp_rank,
                         "layer_range": [first, first + n_local],
                         "partition_dims": {n: int(p.partition_dim) for n, p in module.named_parameters()
                                            if getattr(p, "partition_dim", None) is not None},
                         "pipeline_duplicates": [n for n, p in module.named_parameters()
                                                 if getattr(p, "pipeline_duplicate", False)]},
        }

    def save(self, state) -> Optional[str]:
        """Write the checkpoint of state.iteration; a collective: every rank calls it. Returns its directory, or
        None when it could not be written and --save-failure continue lets training go on."""
        cfg, st, it = self.cfg, self.st, state.iteration
        root = cfg.checkpoint.save
        name = iter_dir_name(it)
        tmp, final = os.path.join(root, _TMP_PREFIX + name), os.path.join(root, name)
        t0 = time.perf_counter()
        rank0 = st.rank == 0
        error = agree(_attempt(tmp, self._prepare, root, tmp, it) if rank0 else None)
        if error is None:
            payload = self._payload(state)  # a collective (every data-parallel rank's RNG streams)
            error = agree(_attempt(tmp, self.engine.save, tmp, name, payload))
        share: dict = {}
        if error is None:  # the manifest: every rank checksums a share of the files
            error = agree(_attempt(tmp, lambda: share.update(manifest.hash_share(tmp))))
        if error is None:
            entries = manifest.gather_entries(share)
            error = agree(_attempt(root, self._publish, root, tmp, final, name, it, entries) if rank0 else None)
        if error is not None:
            return self._save_failed(root, tmp, it, error)
        self.last_saved = it
        if self.log is not None:
            self.log.print(f" saved checkpoint at iteration {it} to {root} ({time.perf_counter() - t0:.2f} s)")
        return final

    def _prepare(self, root: str, tmp: str, it: int) -> None:
        """Rank 0, first: the save directory, leftovers of interrupted saves removed, the temporary directory
        with metadata.json."""
        os.makedirs(root, exist_ok=True)
        for leftover in os.listdir(root):  # interrupted saves of earlier runs
            if leftover.startswith((_TMP_PREFIX, _OLD_PREFIX)):
                shutil.rmtree(os.path.join(root, leftover), ignore_errors=True)
        os.makedirs(tmp)
        write_text_atomic(os.path.join(tmp, METADATA_FILE),
                          json.dumps(_metadata(self.cfg, self.st, it, self.gbs, self.engine.kind), indent=1))

    def _publish(self, root: str, tmp: str, final: str, name: str, it: int, entries: dict) -> None:
        """Rank 0, last: the manifest, the rename into place, the latest pointer, pruning."""
        write_text_atomic(os.path.join(tmp, manifest.MANIFEST_FILE),
                          manifest.manifest_text(entries, next_save_seq(root)))
        _fsync_dir(tmp)
        old = None
        if os.path.exists(final):  # saving the same iteration again: swap, then drop the old copy
            old = os.path.join(root, _OLD_PREFIX + name)
            os.replace(final, old)
        os.replace(tmp, final)
        try:
            _fsync_dir(root)
            write_text_atomic(os.path.join(root, LATEST_FILE), str(it))
        except BaseException:  # the pointer did not move: what it names must stay what it named
            shutil.rmtree(final, ignore_errors=True)
            if old is not None:
                os.replace(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        try:  # the checkpoint is saved now: nothing after this may report it lost
            self.engine.published(root, name)
        except (OSError, ConfigError) as e:
            if self.log is not None:
                self.log.print(f" warning: iteration {it} saved, but {write_error(root, e)} (the engine's own "
                               "pointer, e.g. DeepSpeed's latest, is not updated)")
        self._prune(root)

    def _save_failed(self, root: str, tmp: str, it: int, error: str) -> None:
        """Remove what the failed save wrote; one line; stop (raise) or, with --save-failure continue, go on."""
        if self.st.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            previous = read_latest_iteration(root)
        except ConfigError:
            previous = None
        kept = (f"the previous checkpoint (iteration {previous}) and {LATEST_FILE} are unchanged"
                if previous is not None else "no earlier checkpoint")
        msg = f"--save: checkpoint of iteration {it} not saved: {error}; {kept}"
        if self.cfg.checkpoint.save_failure == "continue":
            if self.log is not None:
                self.log.print(f" warning: {msg}; training continues (--save-failure continue)")
            return None
        raise CheckpointSaveError(msg)

    def _prune(self, root: str) -> None:
        """--keep-last N: the newest N saves by save order stay, and always the one the latest pointer names."""
        keep = self.cfg.checkpoint.keep_last
        if not keep:
            return
        for path in prune_list(root, keep):
            shutil.rmtree(path, ignore_errors=True)

    # --------------------------------------------------------------------------------------------- load
    def load(self, root: str, iteration: int) -> TrainState:
        """Restore this rank's part of the checkpoint; returns the TrainState to continue from."""
        cfg, st = self.cfg, self.st
        ck = cfg.checkpoint
        meta = read_metadata(root, iteration)
        safe_load.check_checkpoint(os.path.join(root, iter_dir_name(iteration)), meta)  # before any unpickling
        payload = self.engine.load(root, iteration, meta, load_optimizer=not (ck.no_load_optim or ck.finetune))
        if not (ck.no_load_rng or ck.finetune) and payload.get("rng_state"):
            states = payload["rng_state"]
            set_rng_state(states[st.dp_rank if st.dp_rank < len(states) else 0])
        state = TrainState()
        if not ck.finetune:
            state.iteration = int(payload["iteration"])
            ts = payload.get("train_state") or {}
            state.cumulative_flops = int(ts.get("cumulative_flops", 0))
            state.full_cumulative_flops = int(ts.get("full_cumulative_flops", 0))
            state.nonfinite_steps = int(ts.get("nonfinite_steps", 0))
        self.last_saved = state.iteration if not ck.finetune else None
        if self.log is not None:
            self.log.print(f" loaded checkpoint {root} at iteration {iteration}"
                           + (" (weights only, starting at iteration 0)" if ck.finetune else ""))
        return state


def _attempt(path: str, fn, *args) -> Optional[str]:
    """Run one phase of a save; the one-line description of a write failure, None when it succeeded (any other
    error is a bug and propagates with its traceback)."""
    try:
        fn(*args)
    except Exception as e:
        if not is_io_failure(e):
            raise
        return str(write_error(path, e))
    return None


def load_model_weights(model: torch.nn.Module, payload: dict, path: str) -> None:
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    if missing or unexpected:
        raise ConfigError(f"--load: {path} does not fit the model (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]})")


def read_shard(root: str, iteration: int, st: ParallelState) -> tuple[dict, str]:
    """This rank's plain-format shard of a checkpoint, and its path."""
    path = shard_path(root, iteration, st.tp_rank, st.pp_rank, st.pp)
    if not os.path.isfile(path):
        raise ConfigError(f"--load {root}: shard {path} is missing")
    return torch.load(path, map_location="cpu", weights_only=True), path


def load_weights_only(model: torch.nn.Module, root: str, iteration: int, st: ParallelState) -> None:
    """Model weights of a plain-format checkpoint into this rank's (unwrapped) model."""
    load_model_weights(model, *read_shard(root, iteration, st))


def setup_checkpointing(cfg: Config, st: ParallelState, engine, gbs: int, log, resume: Optional[tuple[str, int]]):
    """The Checkpointer for a run (with the exit-signal handler installed when asked for) and the TrainState to
    start from: loaded from `resume` (see resolve_load) or fresh."""
    from megatron_est.training.signals import ExitSignalHandler

    handler = ExitSignalHandler().__enter__() if cfg.checkpoint.exit_signal_handler else None
    ckpt = Checkpointer(cfg, st, engine, gbs=gbs, signal_handler=handler, log=log)
    state = ckpt.load(*resume) if resume is not None else TrainState()
    return ckpt, state
