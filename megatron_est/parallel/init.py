"""Weight initialisation that does not depend on the parallel layout.

Each parameter's full (unsharded) tensor is drawn from its own generator seeded by (seed, parameter name); a
rank then keeps its shard. A TP=2 model therefore starts from exactly the TP=1 weights.
"""
from __future__ import annotations

import zlib

import torch


def name_seed(seed: int, name: str) -> int:
    return (seed * 2_654_435_761 + zlib.crc32(name.encode())) % (2**63 - 1)


def normal_full(shape: tuple[int, ...], std: float, seed: int, name: str) -> torch.Tensor:
    g = torch.Generator(device="cpu")
    g.manual_seed(name_seed(seed, name))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g)


def shard(full: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return full.chunk(world, dim=dim)[rank].clone()
