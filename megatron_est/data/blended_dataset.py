"""Blend several datasets by weight (--data-path 0.7 prefixA 0.3 prefixB).

Sample j of dataset d is scheduled at time (j + 0.5) / w_d and the blend takes samples in time order. Every
prefix of n blended samples then holds n * w_d samples of dataset d give or take about one (at most half the
number of datasets): the proportions hold at every step of training, not just on average. Deterministic, no randomness needed: the components are
already shuffled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .errors import DataError


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DataError(f"--data-path: blend weights must be non-negative numbers with a positive sum, got {list(weights)}")
    return w / w.sum()


def samples_per_dataset(weights: np.ndarray, num_samples: int) -> list[int]:
    """How many samples each component must provide so the blend of num_samples never runs dry."""
    # The time-ordered merge can run ahead of n * w_d by up to half the number of datasets.
    return [math.ceil(num_samples * w) + len(weights) if w > 0 else 0 for w in weights]


def build_blend_indices(weights: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset id, sample within that dataset) for each of num_samples blended samples."""
    counts = samples_per_dataset(weights, num_samples)
    times = np.concatenate([(np.arange(n) + 0.5) / w for n, w in zip(counts, weights) if n])
    ids = np.concatenate([np.full(n, d, dtype=np.int16) for d, n in enumerate(counts) if n])
    within = np.concatenate([np.arange(n, dtype=np.int64) for n in counts if n])
    order = np.argsort(times, kind="stable")[:num_samples]  # stable: ties go to the earlier dataset
    return ids[order], within[order]


class BlendedDataset(torch.utils.data.Dataset):
    """num_samples samples drawn from the components in proportion to the weights."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float], num_samples: int) -> None:
        if len(datasets) != len(weights):
            raise DataError(f"--data-path: {len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.dataset_index, self.sample_index = build_blend_indices(self.weights, num_samples)
        for d, ds in enumerate(self.datasets):
            used = self.sample_index[self.dataset_index == d]
            if len(used) and int(used.max()) >= len(ds):
                raise DataError(f"blend component {d} has {len(ds)} samples, {int(used.max()) + 1} needed")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]
