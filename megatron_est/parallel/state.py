"""Process groups in Megatron's order: tensor-parallel innermost, then data-parallel, then pipeline.

global rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_est.config import ConfigError


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

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of this rank's counterpart (same dp and tp position) on pipeline stage pp_rank."""
        return pp_rank * self.tp * self.dp + self.dp_rank * self.tp + self.tp_rank


SINGLE = ParallelState()


def env_rank_and_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or slurm's environment; (0, 1, 0) when neither is set."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def check_world_factorization(world_size: int, tp: int, pp: int) -> int:
    """Return the data-parallel size, or refuse a world size that does not factor into TP x PP x DP."""
    if tp < 1 or pp < 1 or world_size % (tp * pp) != 0:
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} does not divide the "
            f"world size {world_size}")
    return world_size // (tp * pp)


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize(tp: int = 1, pp: int = 1, backend: Optional[str] = None, timeout_s: int = 600) -> ParallelState:
    """Initialise torch.distributed from the environment (if not already) and build the groups."""
    rank, world, local_rank = env_rank_and_world()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    dp = check_world_factorization(world, tp, pp)
    backend = backend or _default_backend()
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if world == 1 and not dist.is_initialized():
        return ParallelState(device=device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return build_groups(ParallelState(world, rank, tp, pp, dp, device=device))


def _own_group(st: ParallelState, rank_lists: list[list[int]]) -> Optional[dist.ProcessGroup]:
    """Create a group for every rank list (collective: all ranks, same order); return the one holding us."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if st.rank in ranks:
            mine = group
    return mine


def build_groups(st: ParallelState) -> ParallelState:
    """Every rank creates every group in the same order, as new_group requires."""
    tp, pp, dp = st.tp, st.pp, st.dp
    assert st.world_size == tp * pp * dp

    def r(p: int, d: int, t: int) -> int:
        return p * dp * tp + d * tp + t

    st.tp_group = _own_group(st, [[r(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)])
    st.dp_group = _own_group(st, [[r(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)])
    st.pp_group = _own_group(st, [[r(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)])
    if pp > 1:  # first and last stage of each (data, tensor) position: the tied word embedding's two copies
        st.embd_group = _own_group(st, [[r(0, d, t), r(pp - 1, d, t)] for d in range(dp) for t in range(tp)])
    return st


def destroy() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
