"""Deterministic global-batch indexing: which samples each data-parallel rank reads at each step.

Step t consumes samples [t*G, (t+1)*G) of the dataset (G = global batch size). Micro-batch m of DP rank r
reads samples t*G + m*(mbs*dp) + r*mbs + [0, mbs). Resuming at step t needs nothing but t.
"""
from __future__ import annotations

from typing import Protocol

import torch


class TokenDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict: ...  # {"tokens": LongTensor[seq_length + 1]}


class MicroBatches:
    def __init__(self, dataset: TokenDataset, global_batch: int, micro_batch: int, dp: int, dp_rank: int):
        self.ds, self.gbs, self.mbs, self.dp, self.dp_rank = dataset, global_batch, micro_batch, dp, dp_rank
        self.num_micro = global_batch // (micro_batch * dp)

    def get(self, step: int, micro: int) -> torch.Tensor:
        first = step * self.gbs + micro * self.mbs * self.dp + self.dp_rank * self.mbs
        n = len(self.ds)
        return torch.stack([self.ds[(first + j) % n]["tokens"] for j in range(self.mbs)])


class RandomTokens:
    """Uniform random tokens: a stand-in dataset for unit tests and benchmarks that need no corpus."""

    def __init__(self, vocab: int, seq_length: int, n: int = 4096, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq_length + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self.data[i]}
