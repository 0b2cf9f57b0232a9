"""GPT pretraining samples: windows of seq_length+1 tokens cut across document boundaries.

Three indices, as in Megatron (our own implementation):
- document index: the split's documents, shuffled afresh in each epoch, epochs concatenated;
- sample index: where sample i starts and ends in that token stream, as (document position, offset) pairs;
  consecutive samples share one token (the last label of one is the first input of the next);
- shuffle index: a permutation of samples. Samples of the last epoch are shuffled separately and placed last,
  so every earlier epoch is consumed completely before the final, partial one.
All three are a pure function of (data, split range, seq_length, seed, epochs), so every tensor- and
pipeline-parallel rank gets the same samples. They are cached on disk, built once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import DataError
from .indexed_dataset import IndexedDataset, index_file_path

INDEX_FORMAT = 2  # bump when the index construction changes, to invalidate old caches


@dataclass(frozen=True)
class SampleIndexSpec:
    """Everything the indices depend on; its hash names the cache entry."""

    prefix: str
    index_fingerprint: str
    split_name: str
    first_sequence: int
    end_sequence: int
    seq_length: int
    seed: int
    num_epochs: int
    format: int = INDEX_FORMAT

    def key(self) -> str:
        # Not the path: the indices depend only on the .idx content, and nodes may mount data at other paths.
        blob = json.dumps({k: v for k, v in asdict(self).items() if k != "prefix"}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose concatenated stream yields num_samples windows of seq_length+1 tokens."""
    if tokens_per_epoch <= 0:
        return 0
    needed_tokens = num_samples * seq_length + 1
    return max(1, -(-needed_tokens // tokens_per_epoch))


def build_document_index(num_documents: int, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.permutation(num_documents).astype(np.int32) for _ in range(num_epochs)])


def build_sample_index(doc_lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """[num_samples+1, 2] int64 (document position, offset) of every sample boundary token.

    Sample i is the tokens from boundary i through boundary i+1 inclusive (seq_length+1 tokens).
    """
    ends = np.cumsum(doc_lengths, dtype=np.int64)
    num_samples = (int(ends[-1]) - 1) // seq_length
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # side="right" skips empty documents: a boundary lands in the first document that has its token.
    doc_pos = np.searchsorted(ends, positions, side="right")
    starts = ends - doc_lengths
    return np.stack([doc_pos, positions - starts[doc_pos]], axis=1)


def build_shuffle_index(num_samples: int, last_epoch_start: int, rng: np.random.Generator) -> np.ndarray:
    head = rng.permutation(last_epoch_start)
    tail = last_epoch_start + rng.permutation(num_samples - last_epoch_start)
    return np.concatenate([head, tail]).astype(np.int64)


def index_fingerprint(path: str, edge: int = 1 << 20) -> str:
    """A content hash of a .idx: its size, first and last MiB (the header, sequence lengths, document index).

    The sample indices depend only on the .idx, and content (unlike mtime) is the same for every node that
    sees the file, even if each rebuilt it."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(edge))
        if size > edge:
            f.seek(max(edge, size - edge))
            h.update(f.read())
    return h.hexdigest()[:32]


class GPTDataset(torch.utils.data.Dataset):
    """Map-style dataset of {"tokens": LongTensor[seq_length+1]} over one split of one indexed dataset."""

    def __init__(
        self,
        indexed: IndexedDataset,
        split_name: str,
        sequence_range: tuple[int, int],
        seq_length: int,
        seed: int,
        num_samples: int,
        cache_dir: str | None,
        build: bool = True,
    ) -> None:
        """build=False: only load a cache entry another process built (raise DataError if absent)."""
        self.indexed = indexed
        self.seq_length = seq_length
        first, end = sequence_range
        self.sequences = np.arange(first, end, dtype=np.int64)
        lengths = indexed.sequence_lengths[first:end].astype(np.int64)
        tokens_per_epoch = int(lengths.sum())
        if num_samples > 0 and tokens_per_epoch < 2:
            raise DataError(
                f"{indexed.prefix}: the {split_name} split has {tokens_per_epoch} tokens in {end - first} "
                f"documents, too few for {num_samples} samples (check --split)"
            )
        num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
        self.spec = SampleIndexSpec(
            os.path.abspath(indexed.prefix), index_fingerprint(index_file_path(indexed.prefix)), split_name, first, end,
            seq_length, seed, num_epochs,
        )
        self.cache_path = None if cache_dir is None else os.path.join(
            cache_dir, f"{os.path.basename(indexed.prefix)}-{split_name}-{self.spec.key()}"
        )
        self.built_here = False  # whether this process built the indices (False: loaded from the cache)
        if self.cache_path and os.path.isfile(os.path.join(self.cache_path, "spec.json")):
            arrays = self._load(self.cache_path)
        elif build:
            self.built_here = True
            arrays = self._build(lengths, tokens_per_epoch)
            if self.cache_path:
                self._save(self.cache_path, arrays)
        else:
            raise DataError(f"sample index cache {self.cache_path} was not built by rank 0 (is cache_dir shared?)")
        self.document_index, self.sample_index, self.shuffle_index = arrays
        if len(self) < num_samples:  # cannot happen unless a cache entry was tampered with
            raise DataError(f"{self.cache_path}: holds {len(self)} samples, {num_samples} needed")

    def _build(self, lengths: np.ndarray, tokens_per_epoch: int) -> tuple[np.ndarray, ...]:
        num_epochs = self.spec.num_epochs
        if num_epochs == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty.astype(np.int32), np.zeros((1, 2), dtype=np.int64), empty
        rng = np.random.default_rng(self.spec.seed)
        doc_index = build_document_index(len(lengths), num_epochs, rng)
        sample_index = build_sample_index(lengths[doc_index], self.seq_length)
        num_samples = len(sample_index) - 1
        last_epoch_start = min(num_samples, (num_epochs - 1) * tokens_per_epoch // self.seq_length)
        return doc_index, sample_index, build_shuffle_index(num_samples, last_epoch_start, rng)

    def _save(self, path: str, arrays: tuple[np.ndarray, ...]) -> None:
        # Build the entry in a temporary directory and rename it: readers never see half an entry.
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        try:
            for name, arr in zip(("document_index", "sample_index", "shuffle_index"), arrays):
                np.save(os.path.join(tmp, name + ".npy"), arr)
            with open(os.path.join(tmp, "spec.json"), "w") as f:
                json.dump(asdict(self.spec), f, indent=1)
            os.rename(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "spec.json")):  # lost a race to an equal entry: fine
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _load(path: str) -> tuple[np.ndarray, ...]:
        try:
            return tuple(
                np.load(os.path.join(path, n + ".npy"), mmap_mode="r")
                for n in ("document_index", "sample_index", "shuffle_index")
            )
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: corrupt sample index cache ({e}); delete it to rebuild") from None

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def tokens(self, i: int) -> np.ndarray:
        """Sample i (after shuffling) as int64 numpy."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        j = int(self.shuffle_index[i])
        (d0, o0), (d1, o1) = self.sample_index[j], self.sample_index[j + 1]
        seq = self.sequences[self.document_index[d0:d1 + 1]]
        if d0 == d1:
            return self.indexed.get(int(seq[0]), int(o0), int(o1 - o0 + 1)).astype(np.int64)
        parts = [self.indexed.get(int(seq[0]), int(o0))]
        parts += [self.indexed.get(int(s)) for s in seq[1:-1]]
        parts.append(self.indexed.get(int(seq[-1]), 0, int(o1) + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"tokens": torch.from_numpy(self.tokens(i))}
