"""A run's parallel layout as named dimensions: the one place that maps ranks to coordinates, counts the
data-parallel size and derives the global batch.

Dimensions are ordered innermost first, as in Megatron: tensor-parallel ranks are neighbours (one node), then
data-parallel, then pipeline stages. For (tp, dp, pp):

    global rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

A new dimension (context parallelism, virtual pipeline stages) is one more name in DIMS and one more size.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Iterable, Optional

from megatron_est.config import ConfigError, TrainConfig

DIMS = ("tp", "dp", "pp")  # innermost first


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    dp: int = 1
    pp: int = 1

    @classmethod
    def of(cls, world_size: int, tp: int = 1, pp: int = 1) -> "Layout":
        """The layout of a world of `world_size` ranks: data-parallel size = world / (tp x pp), or a refusal."""
        if tp < 1 or pp < 1:
            raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        if world_size % (tp * pp) != 0:
            raise ConfigError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                              f"--pipeline-model-parallel-size {pp}")
        return cls(tp=tp, dp=world_size // (tp * pp), pp=pp)

    def size(self, dim: str) -> int:
        return getattr(self, dim)

    @property
    def world_size(self) -> int:
        n = 1
        for d in DIMS:
            n *= self.size(d)
        return n

    def coords(self, rank: int) -> dict[str, int]:
        """{dim: coordinate} of a global rank."""
        out = {}
        for d in DIMS:
            rank, out[d] = divmod(rank, self.size(d))
        return out

    def rank(self, **coords: int) -> int:
        """The global rank at these coordinates (missing dimensions: 0)."""
        r, stride = 0, 1
        for d in DIMS:
            r += coords.get(d, 0) * stride
            stride *= self.size(d)
        return r

    def groups(self, dims: Iterable[str]) -> list[list[int]]:
        """Every group of ranks that differ only along `dims` (e.g. ("tp",): the tensor-parallel groups), in a
        fixed order that all ranks share (torch's new_group must be called in the same order everywhere)."""
        inner = [d for d in DIMS if d in tuple(dims)]
        outer = [d for d in DIMS if d not in inner]
        out = []
        for fixed in product(*(range(self.size(d)) for d in reversed(outer))):
            base = dict(zip(reversed(outer), fixed))
            out.append([self.rank(**base, **dict(zip(reversed(inner), moving)))
                        for moving in product(*(range(self.size(d)) for d in reversed(inner)))])
        return out

    def global_batch(self, tr: TrainConfig) -> int:
        """--global-batch-size, or by default one micro-batch per data-parallel rank."""
        return tr.global_batch_size or tr.micro_batch_size * self.dp

    def micro_batches(self, tr: TrainConfig, gbs: Optional[int] = None) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step."""
        return (gbs or self.global_batch(tr)) // (tr.micro_batch_size * self.dp)
