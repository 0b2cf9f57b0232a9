"""One call from Megatron-style flags (--data-path, --split) to train/valid/test datasets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .blended_dataset import BlendedDataset, normalize_weights, samples_per_dataset
from .errors import DataError
from .gpt_dataset import GPTDataset
from .indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")


def parse_data_path(data_path: Sequence[str | float] | str) -> list[tuple[float, str]]:
    """[prefix] or [w1, prefix1, w2, prefix2, ...] (items may also be one whitespace-separated string)."""
    items = data_path.split() if isinstance(data_path, str) else [
        part for item in data_path for part in (str(item).split() if isinstance(item, str) else [item])
    ]
    if len(items) == 1:
        return [(1.0, str(items[0]))]
    if not items or len(items) % 2:
        raise DataError(f"--data-path: expected one prefix or weight/prefix pairs, got {items}")
    pairs = []
    for w, prefix in zip(items[::2], items[1::2]):
        try:
            pairs.append((float(w), str(prefix)))
        except ValueError:
            raise DataError(f"--data-path: {w!r} is not a weight (expected weight/prefix pairs)") from None
    normalize_weights([w for w, _ in pairs])  # validates
    return pairs


def parse_split(split: str) -> np.ndarray:
    """'969,30,1' (or '98/2/0', or '100') -> normalised train/valid/test fractions."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise DataError(f"--split: {split!r} is not comma-separated numbers like 969,30,1") from None
    if len(parts) > 3 or any(p < 0 or not math.isfinite(p) for p in parts) or sum(parts) <= 0:
        raise DataError(f"--split: {split!r} needs up to three non-negative weights with a positive sum")
    parts += [0.0] * (3 - len(parts))
    return np.asarray(parts) / sum(parts)


def split_document_ranges(num_documents: int, fractions: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous document ranges per split, by rounding cumulative fractions.

    Unlike plain rounding, every split with a positive fraction gets at least one document when there are
    enough (taken from the largest split), so a small corpus still has a validation and a test set.
    """
    sizes = np.diff(np.round(np.concatenate([[0.0], np.cumsum(fractions)]) * num_documents).astype(np.int64))
    wanted = fractions > 0
    if num_documents >= int(wanted.sum()):
        for s in np.flatnonzero(wanted & (sizes == 0)):
            sizes[int(np.argmax(sizes))] -= 1
            sizes[s] = 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(3)]


def _build_split(
    indexed: list[IndexedDataset], weights: np.ndarray, split_index: int, fractions: np.ndarray,
    seq_length: int, seed: int, num_samples: int, cache_dir: str | None, build: bool,
) -> torch.utils.data.Dataset | None:
    name = SPLIT_NAMES[split_index]
    if num_samples <= 0:
        return None
    present = []  # (indexed dataset, weight, sequence range) of the sources with documents in this split
    for ds, w in zip(indexed, weights):
        first_doc, end_doc = split_document_ranges(ds.num_documents, fractions)[split_index]
        if w > 0 and end_doc > first_doc:
            present.append((ds, w, (int(ds.document_indices[first_doc]), int(ds.document_indices[end_doc]))))
    if not present:
        sources = ", ".join(ds.prefix for ds in indexed)
        raise DataError(f"--split: the {name} split of {sources} has no documents but {num_samples} samples were requested")
    if len(indexed) == 1:
        ds, _, seq_range = present[0]
        return GPTDataset(ds, name, seq_range, seq_length, seed, num_samples, cache_dir, build=build)
    # A source without documents in this split drops out; the others share its weight.
    part_weights = normalize_weights([w for _, w, _ in present])
    parts = [
        GPTDataset(ds, name, seq_range, seq_length, seed, n, cache_dir, build=build)
        for (ds, _, seq_range), n in zip(present, samples_per_dataset(part_weights, num_samples))
    ]
    return BlendedDataset(parts, part_weights, num_samples)


def _build_all(
    pairs: list[tuple[float, str]], split: str, seq_length: int, seed: int, num_samples: Sequence[int],
    cache_dir: str | None, vocab_size: int | None, build: bool,
) -> tuple[torch.utils.data.Dataset | None, ...]:
    indexed = [IndexedDataset(prefix) for _, prefix in pairs]
    if vocab_size is not None and build:
        for ds in indexed:
            ds.check_vocab(vocab_size)
    weights = normalize_weights([w for w, _ in pairs])
    fractions = parse_split(split)
    return tuple(
        _build_split(indexed, weights, i, fractions, seq_length, seed, int(num_samples[i]), cache_dir, build)
        for i in range(3)
    )


def build_train_valid_test_datasets(
    data_path: Sequence[str | float] | str,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int],
    cache_dir: str | None,
    vocab_size: int | None = None,
) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset | None, torch.utils.data.Dataset | None]:
    """(train, valid, test) map-style datasets of {"tokens": LongTensor[seq_length+1]}.

    Each has len() >= its requested number of samples; a split asked for 0 samples is None. With
    torch.distributed initialised and a cache_dir, this is collective: rank 0 builds the sample indices into
    cache_dir (which all ranks must share) and the others load them; an error on rank 0 is raised on every
    rank. vocab_size, if given, refuses token ids outside the vocabulary (one pass over each .bin).
    """
    if seq_length < 1:
        raise DataError(f"--seq-length must be positive, got {seq_length}")
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise DataError(f"num_samples must be three non-negative counts (train, valid, test), got {num_samples}")
    pairs = parse_data_path(data_path)
    args = (pairs, split, seq_length, seed, num_samples, cache_dir, vocab_size)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or cache_dir is None:
        return _build_all(*args, build=True)  # no shared cache: each process builds the same indices itself
    rank0 = torch.distributed.get_rank() == 0
    result, error, message = None, None, [None]
    if rank0:
        try:
            result = _build_all(*args, build=True)
        except Exception as e:  # every rank must reach the broadcast, or the others wait forever
            error, message = e, [" ".join(str(e).split()) or type(e).__name__]
    torch.distributed.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise DataError(f"rank 0 failed to build the datasets: {message[0]}")
    return result if rank0 else _build_all(*args, build=False)
