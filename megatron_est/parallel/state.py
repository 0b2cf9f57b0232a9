"""Process groups in Megatron's order: tensor-parallel innermost, then data-parallel, then pipeline (the rank
arithmetic is parallel/layout.py's), and the launch environment (torchrun, one process per Slurm task).
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_est.config import ConfigError
from megatron_est.parallel.layout import Layout

DEFAULT_TIMEOUT_MINUTES = 10.0  # Megatron's --distributed-timeout-minutes default (ParallelConfig's too)

@dataclass
class ParallelState:
    world_size: int = 1
    rank: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    # First and last pipeline stage of one (dp, tp) position: sums the tied word-embedding gradient of the
    # two copies (only built when pp > 1).
    embd_group: Optional[dist.ProcessGroup] = None
    device: torch.device = torch.device("cpu")
    # Timeout of every collective in every group; new_group() would otherwise use torch's default, not ours.
    timeout: datetime.timedelta = datetime.timedelta(minutes=DEFAULT_TIMEOUT_MINUTES)

    @property
    def layout(self) -> Layout:
        return Layout(tp=self.tp, dp=self.dp, pp=self.pp)

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)["tp"]

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)["dp"]

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)["pp"]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of this rank's counterpart (same dp and tp position) on pipeline stage pp_rank."""
        return self.layout.rank(tp=self.tp_rank, dp=self.dp_rank, pp=pp_rank)


SINGLE = ParallelState()


def env_rank_and_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or slurm's environment; (0, 1, 0) when neither is set."""
    env = os.environ
    if ("RANK" in env) != ("WORLD_SIZE" in env):  # half a torchrun environment: one process would train alone
        given, missing = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise ConfigError(f"launch environment: {given}={env[given]!r} is set but {missing} is not: set both (as "
                          f"torchrun does) or neither (one process); for a plan of N ranks without a launcher use "
                          f"--dry-run --world-size N")
    if "RANK" in env and "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and not _slurm_batch_script(env):
        # the srun step's tasks, not the job's
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS",
                 "SLURM_LOCALID")
    else:
        return 0, 1, 0
    rank, world, local = (_env_int(env, n) for n in names)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"launch environment: {names[0]}={rank} {names[1]}={world} {names[2]}={local}: need "
                          f"{names[1]} >= 1, 0 <= {names[0]} < {names[1]} and {names[2]} >= 0")
    return rank, world, local


def _env_int(env, name: str) -> int:
    """A launcher variable as an integer (absent local ranks are 0), or one line naming it: a malformed value is
    the root cause of everything that depends on the world size, so it is refused before any of it."""
    text = env.get(name, "0")
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"launch environment: {name}={text!r} is not an integer (torchrun and srun set it; "
                          "fix or unset it)") from None


def _slurm_batch_script(env) -> bool:
    """Started by an sbatch script or salloc shell itself, not by srun: Slurm sets SLURM_PROCID=0 and the job's
    SLURM_NTASKS there too (measured, Slurm 22.05), but one process would wait forever for the others."""
    return "SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env


def export_launch_env() -> tuple[int, int, int]:
    """Write RANK, WORLD_SIZE and LOCAL_RANK as torchrun would (from Slurm's variables without torchrun).

    DeepSpeed's engine reads LOCAL_RANK from the environment and fails without it, so one process per Slurm
    task (srun, no torchrun) needs it set; torchrun's values are written back unchanged."""
    rank, world, local_rank = env_rank_and_world()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    return rank, world, local_rank


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _cuda_device(local_rank: int) -> torch.device:
    """This process's GPU: local rank modulo the visible devices, so a Slurm task bound to one GPU
    (--gpus-per-task=1, --gpu-bind) uses device 0 and a task that sees the whole node uses GPU LOCAL_RANK."""
    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError("--distributed-backend nccl: no GPU is visible to this process "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    index = local_rank % count
    torch.cuda.set_device(index)
    # DeepSpeed takes LOCAL_RANK as the CUDA device index (engine.set_device, ZeRO-3's local device).
    os.environ["LOCAL_RANK"] = str(index)
    return torch.device("cuda", index)


class RendezvousError(ConfigError):
    """The ranks of a job could not all meet within --distributed-timeout-minutes (one line: where, who)."""


def _init_default_group(backend: str, rank: int, world: int, timeout: datetime.timedelta) -> None:
    env = os.environ
    if world > 1 and "MASTER_ADDR" not in env and int(env.get("SLURM_NNODES", "1")) > 1:
        raise ConfigError("MASTER_ADDR is not set: one process per Slurm task on several nodes needs the first "
                          "node's address (export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST "
                          "| head -n1))")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if world == 1 and "MASTER_PORT" not in env:
        # One process (e.g. DeepSpeed on one GPU): a store on a port the OS picks, so two such runs on one
        # machine never collide; MASTER_PORT tells anything that reads it.
        store = dist.TCPStore(env["MASTER_ADDR"], 0, 1, is_master=True, timeout=timeout)
        env["MASTER_PORT"] = str(store.port)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        return
    env.setdefault("MASTER_PORT", "29517")
    store = rendezvous(env["MASTER_ADDR"], int(env["MASTER_PORT"]), rank, world, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


# ------------------------------------------------------------------------------------------- rendezvous
# torch's env:// rendezvous waits silently for the whole timeout and then raises a store error that names no
# missing rank. Ours meets on the same TCPStore (MASTER_ADDR:MASTER_PORT, hosted by rank 0, or by torchrun's
# agent when it says so), says who is waiting for how many, and fails in one line at the deadline.
_FIRST_NOTICE_S = 5.0  # a normal start, where ranks come up a few seconds apart, prints nothing
_NOTICE_EVERY_S = 60.0


def rendezvous(addr: str, port: int, rank: int, world: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """The job's TCPStore once all `world` ranks have arrived; RendezvousError at the deadline."""
    deadline = time.monotonic() + timeout.total_seconds()
    minutes = f"--distributed-timeout-minutes {timeout.total_seconds() / 60:g}"
    where = f"{addr}:{port}"
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    if rank == 0 and not agent:
        try:
            store = dist.TCPStore(addr, port, world, is_master=True, timeout=timeout, wait_for_workers=False,
                                  multi_tenant=True)
        except (RuntimeError, OSError) as e:
            raise RendezvousError(f"rank 0 cannot host the rendezvous at {where} (MASTER_ADDR/MASTER_PORT): "
                                  f"{_first_line(e)}") from None
    else:
        store = _connect(addr, port, rank, world, deadline, where, minutes)
    store.set_timeout(timeout)
    _wait_for_all(store, rank, world, deadline, where, minutes)
    return store


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _connect(addr, port, rank, world, deadline, where, minutes) -> dist.TCPStore:
    """A client of rank 0's store. Until rank 0 listens, a plain socket probes the port every half second (a
    TCPStore client that cannot connect logs a C++ stack trace on each retry)."""
    start, noticed = time.monotonic(), False
    while True:
        try:
            socket.create_connection((addr, port), timeout=1.0).close()
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RendezvousError(f"rank {rank}: no rendezvous at {where} within {minutes} (rank 0 did not "
                                      f"start or is unreachable: check MASTER_ADDR/MASTER_PORT; {e})") from None
        if not noticed and time.monotonic() - start >= min(_FIRST_NOTICE_S, (deadline - start) / 2):
            _say(f"rank {rank}: waiting for rank 0 at {where} to open the rendezvous (giving up after {minutes})")
            noticed = True
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    left = datetime.timedelta(seconds=max(1.0, deadline - time.monotonic()))
    try:
        return dist.TCPStore(addr, port, world, is_master=False, timeout=left)
    except (RuntimeError, OSError) as e:
        raise RendezvousError(f"rank {rank}: cannot join the rendezvous at {where}: {_first_line(e)}") from None


def _wait_for_all(store, rank, world, deadline, where, minutes) -> None:
    """Count in; poll until the last rank has (a timed store.wait logs a warning per timeout); report the wait;
    fail at the deadline naming who is missing."""
    key = f"megatron_est/rendezvous/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    try:
        store.set(f"{key}rank{rank}", "1")
        if store.add(f"{key}arrived", 1) == world:
            store.set(f"{key}done", "1")
        start = time.monotonic()
        next_notice = start + min(_FIRST_NOTICE_S, (deadline - start) / 2)
        pause = 0.01
        while not store.check([f"{key}done"]):
            now = time.monotonic()
            if now >= deadline:
                _missing_ranks(store, key, world, where, minutes)
            if now >= next_notice:
                waiting = world - store.add(f"{key}arrived", 0)
                _say(f"rank {rank}: waiting for {waiting} rank{'s' if waiting > 1 else ''} at {where} "
                     f"({world - waiting} of {world} arrived; giving up after {minutes})")
                next_notice += _NOTICE_EVERY_S
            time.sleep(min(pause, max(0.0, deadline - now)))
            pause = min(1.0, pause * 2)
    except RuntimeError as e:  # rank 0's store went away (it failed or was killed)
        raise RendezvousError(f"rank {rank}: lost the rendezvous at {where}: {_first_line(e)}") from None


def _missing_ranks(store, key, world, where, minutes):
    missing = [r for r in range(world) if not store.check([f"{key}rank{r}"])]
    shown = ", ".join(map(str, missing[:8])) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    raise RendezvousError(f"rendezvous at {where} incomplete after {minutes}: {world - len(missing)} of {world} "
                          f"ranks arrived (missing rank{'s' if len(missing) > 1 else ''} {shown})")


def initialize(tp: int = 1, pp: int = 1, backend: Optional[str] = None,
               timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES, single_process_group: bool = False) -> ParallelState:
    """Initialise torch.distributed from the environment (if not already) and build the groups.

    With one process no group is created unless single_process_group (DeepSpeed needs one)."""
    rank, world, local_rank = export_launch_env()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    dp = Layout.of(world, tp, pp).dp
    backend = backend or _default_backend()
    device = _cuda_device(local_rank) if backend == "nccl" else torch.device("cpu")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if world == 1 and not dist.is_initialized() and not single_process_group:
        return ParallelState(device=device, timeout=timeout)
    if not dist.is_initialized():
        _init_default_group(backend, rank, world, timeout)
    return build_groups(ParallelState(world, rank, tp, pp, dp, device=device, timeout=timeout))


def _own_group(st: ParallelState, rank_lists: list[list[int]]) -> Optional[dist.ProcessGroup]:
    """Create a group for every rank list (collective: all ranks, same order); return the one holding us."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks, timeout=st.timeout)
        if st.rank in ranks:
            mine = group
    return mine


def build_groups(st: ParallelState) -> ParallelState:
    """Every rank creates every group in the same order, as new_group requires."""
    layout = st.layout
    assert st.world_size == layout.world_size
    st.tp_group = _own_group(st, layout.groups(["tp"]))
    st.dp_group = _own_group(st, layout.groups(["dp"]))
    st.pp_group = _own_group(st, layout.groups(["pp"]))
    if st.pp > 1:  # first and last stage of each (data, tensor) position: the tied word embedding's two copies
        st.embd_group = _own_group(st, [[g[0], g[-1]] for g in layout.groups(["pp"])])
    return st


def destroy() -> None:
    """Clean end of a run: wait for every rank, then tear the groups down."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def abort() -> None:
    """End after an error, without a barrier (a peer may never reach it): tear the groups down at once. Peers
    blocked in a gloo collective with this rank then fail with "Connection closed by peer" within a second;
    under NCCL the launcher (torchrun, srun --kill-on-bad-exit) stops them when this process exits."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "nccl" and hasattr(dist.distributed_c10d, "_abort_process_group"):
            dist.distributed_c10d._abort_process_group()  # ncclCommAbort: does not wait for pending kernels
        else:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 (already failing: the original error is what gets reported)
        pass
