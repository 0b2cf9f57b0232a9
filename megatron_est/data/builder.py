"""One call from Megatron-style flags (--data-path, --split) to train/valid/test datasets."""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from collections.abc import Sequence

import numpy as np
import torch

from .blended_dataset import BlendedDataset, normalize_weights, samples_per_dataset
from .errors import DataError
from .gpt_dataset import GPTDataset, index_fingerprint
from .indexed_dataset import IndexedDataset, data_file_path, index_file_path

SPLIT_NAMES = ("train", "valid", "test")
POLL_S = 0.5  # how often waiting ranks look for rank 0's status file
PROGRESS_S = 60.0  # how often the first waiting rank says it is still waiting


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


def _check_vocab_once(ds: IndexedDataset, vocab_size: int, cache_dir: str | None) -> None:
    """Scan the .bin for out-of-vocabulary ids, once per (dataset content, vocabulary size): a marker in the
    cache remembers a passed scan, which takes minutes for a TinyLlama-sized corpus and would otherwise run
    again on every start and requeue. The dataset is recognised like the sample-index cache (size, first and
    last MiB of the .idx and the .bin)."""
    if cache_dir is None:
        ds.check_vocab(vocab_size)
        return
    content = index_fingerprint(index_file_path(ds.prefix)) + index_fingerprint(data_file_path(ds.prefix))
    key = hashlib.sha256(content.encode()).hexdigest()[:20]
    marker = os.path.join(cache_dir, f"{os.path.basename(ds.prefix)}-vocab{vocab_size}-{key}.ok")
    if os.path.exists(marker):
        return
    ds.check_vocab(vocab_size)
    os.makedirs(cache_dir, exist_ok=True)
    open(marker, "w").close()  # an empty file: a half-written one means the same


def _build_all(
    pairs: list[tuple[float, str]], split: str, seq_length: int, seed: int, num_samples: Sequence[int],
    cache_dir: str | None, vocab_size: int | None, build: bool,
) -> tuple[torch.utils.data.Dataset | None, ...]:
    indexed = [IndexedDataset(prefix) for _, prefix in pairs]
    if vocab_size is not None and build:
        for ds in indexed:
            _check_vocab_once(ds, vocab_size, cache_dir)
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
    timeout_s: float = 600.0,
) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset | None, torch.utils.data.Dataset | None]:
    """(train, valid, test) map-style datasets of {"tokens": LongTensor[seq_length+1]}.

    Each has len() >= its requested number of samples; a split asked for 0 samples is None. With
    torch.distributed initialised and a cache_dir, every rank must call this: rank 0 builds the sample indices
    into cache_dir (which all ranks must share) and the others load them (_rank0_builds); an error on rank 0
    is raised on every rank, and the others give up after timeout_s. vocab_size, if given, refuses token ids
    outside the vocabulary (one pass over each .bin).
    """
    if seq_length < 1:
        raise DataError(f"--seq-length must be positive, got {seq_length}")
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise DataError(f"num_samples must be three non-negative counts (train, valid, test), got {num_samples}")
    pairs = parse_data_path(data_path)
    args = (pairs, split, seq_length, seed, num_samples, cache_dir, vocab_size)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or cache_dir is None or torch.distributed.get_world_size() == 1:
        return _build_all(*args, build=True)  # no shared cache: each process builds the same indices itself
    return _rank0_builds(args, cache_dir, timeout_s)


def _rank0_builds(args: tuple, cache_dir: str, timeout_s: float) -> tuple:
    """Rank 0 builds (a vocabulary scan and index build of a large corpus can take many minutes) while the
    others wait for its status file, outside any collective: a collective would hit the NCCL watchdog's
    timeout. Only two quick collectives remain, which all ranks enter within about a poll interval."""
    dist = torch.distributed
    rank = dist.get_rank()
    token = [secrets.token_hex(8) if rank == 0 else None]  # names this call's status file: no stale ones read
    dist.broadcast_object_list(token, src=0)
    status = os.path.join(cache_dir, f".build-{token[0]}.json")
    if rank == 0:
        try:
            result = _build_all(*args, build=True)
        except Exception as e:  # the others must hear of it, or they wait out the whole timeout
            _write_status(status, e)
            raise
        _write_status(status, None)
    else:
        _wait_for_status(status, timeout_s, rank == 1)
        result = _build_all(*args, build=False)
    dist.barrier()  # everyone has read the status file
    if rank == 0:
        os.remove(status)
    return result


def _write_status(path: str, error: Exception | None) -> None:
    """Rank 0's outcome, written atomically (rename) so a waiting rank never reads half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    msg = None if error is None else " ".join(str(error).split()) or type(error).__name__
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"error": msg, "data_error": isinstance(error, DataError)}, f)
    os.replace(tmp, path)


def _wait_for_status(path: str, timeout_s: float, report: bool) -> None:
    """Poll for rank 0's status file; raise rank 0's error (the same line for a DataError) or a timeout.
    On NFS a new file can take up to the attribute-cache time (about a minute) to appear on other nodes."""
    start = last = time.monotonic()
    while not os.path.exists(path):
        now = time.monotonic()
        if now - start > timeout_s:
            raise DataError(f"rank 0 did not finish building the sample indices in {os.path.dirname(path)} "
                            f"within {timeout_s / 60:g} minutes (--distributed-timeout-minutes; is "
                            "--data-cache-dir on a filesystem that every node shares?)")
        if report and now - last >= PROGRESS_S:
            last = now
            print(f" waiting for rank 0 to build the sample indices in {os.path.dirname(path)}: {now - start:.0f} s "
                  f"(limit {timeout_s:.0f} s, --distributed-timeout-minutes)", flush=True)
        time.sleep(POLL_S)
    with open(path) as f:
        status = json.load(f)
    if status["error"] is not None:
        msg = status["error"]
        raise DataError(msg if status["data_error"] else f"rank 0 failed to build the datasets: {msg}")
