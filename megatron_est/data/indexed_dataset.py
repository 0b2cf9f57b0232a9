"""Megatron's indexed dataset: token ids in a .bin, their layout in a .idx (the MMIDIDX format).

.idx layout, all little-endian:
    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code of the .bin tokens (DTYPE_CODES)
    uint64    S, number of sequences
    uint64    D, length of the document index (number of documents + 1: it starts with 0)
    int32[S]  sequence lengths, in tokens
    int64[S]  sequence pointers, byte offsets into .bin
    int64[D]  document index: document k is sequences [doc[k], doc[k+1])
.bin: the sequences' tokens, back to back, in that dtype.

Files written here are Megatron-compatible and Megatron's files load here. Both files are written under temporary
names and renamed at the end (.bin first, .idx last), so an interrupted run leaves nothing under the final names.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

from .errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def smallest_token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned-or-int32 dtype that holds every id below vocab_size."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 31:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


class IndexedDatasetWriter:
    """Streams sequences into prefix.bin/.idx. Use as a context manager: files appear only on clean exit."""

    def __init__(self, prefix: str, dtype: np.dtype | type) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise DataError(f"{prefix}: dtype {self.dtype} has no MMIDIDX code")
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        base = os.path.basename(prefix)
        self._tmp_bin = tempfile.NamedTemporaryFile(dir=directory, prefix=f".{base}.", suffix=".bin.tmp", delete=False)
        self._tmp_idx = self._tmp_bin.name[: -len(".bin.tmp")] + ".idx.tmp"
        self._lengths: list[int] = []
        self._doc_index: list[int] = [0]
        self.num_tokens = 0

    def add_sequence(self, tokens: np.ndarray | Sequence[int]) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        if arr.size >= 1 << 31:
            raise DataError(f"{self.prefix}: a sequence of {arr.size} tokens exceeds the int32 length field")
        self._tmp_bin.write(arr.tobytes(order="C"))
        self._lengths.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def end_document(self) -> None:
        self._doc_index.append(len(self._lengths))

    def add_document(self, tokens: np.ndarray | Sequence[int]) -> None:
        """A document of one sequence (the usual case for GPT pretraining)."""
        self.add_sequence(tokens)
        self.end_document()

    @property
    def num_documents(self) -> int:
        return len(self._doc_index) - 1

    def _write_index(self) -> None:
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self._doc_index)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.asarray(self._doc_index, dtype=np.int64).tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())

    def finalize(self) -> None:
        if self._doc_index[-1] != len(self._lengths):
            self.end_document()  # trailing sequences without end_document() form the last document
        self._tmp_bin.flush()
        os.fsync(self._tmp_bin.fileno())
        self._tmp_bin.close()
        os.chmod(self._tmp_bin.name, 0o666 & ~_umask())  # NamedTemporaryFile makes it 0600
        self._write_index()
        os.replace(self._tmp_bin.name, data_file_path(self.prefix))
        os.replace(self._tmp_idx, index_file_path(self.prefix))  # last: a present .idx means a complete pair

    def abort(self) -> None:
        self._tmp_bin.close()
        for path in (self._tmp_bin.name, self._tmp_idx):
            if os.path.exists(path):
                os.unlink(path)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.finalize()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def write_indexed_dataset(prefix: str, documents: Iterable[Sequence[int]], dtype: np.dtype | type) -> str:
    """Write documents (one sequence each) to prefix.bin/.idx; return the prefix."""
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(doc)
    return prefix


class IndexedDataset:
    """Read-only, memory-mapped view of prefix.bin/.idx; validates the pair before use.

    Item i is sequence i as a numpy array (a view into the memory map).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise DataError(f"indexed dataset file not found: {path}")
        self._read_index(idx_path)
        self._check_bin(bin_path)

    def _read_index(self, path: str) -> None:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or header[: len(MAGIC)] != MAGIC:
            raise DataError(f"{path}: not an MMIDIDX index (bad magic or shorter than the header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION:
            raise DataError(f"{path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise DataError(f"{path}: unknown dtype code {code}")
        expected = HEADER_SIZE + n_seq * (4 + 8) + n_doc * 8
        if size != expected:
            raise DataError(f"{path}: index is {size} bytes but its header implies {expected} (truncated or corrupt)")
        if n_doc < 1:
            raise DataError(f"{path}: document index is empty (it must start with 0)")
        self.dtype = np.dtype(DTYPE_CODES[code])
        mm = np.memmap(path, mode="r", dtype=np.uint8)
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=off)
        off += n_seq * 4
        self.sequence_pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=off)
        off += n_seq * 8
        self.document_indices = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=off)
        self._validate_arrays(path)

    def _validate_arrays(self, path: str) -> None:
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        if len(lengths) and lengths.min() < 0:
            raise DataError(f"{path}: negative sequence length")
        expected = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=expected[1:])
        if not np.array_equal(pointers, expected):
            raise DataError(f"{path}: sequence pointers disagree with sequence lengths (corrupt index)")
        if docs[0] != 0 or docs[-1] != len(lengths) or (len(docs) > 1 and np.any(np.diff(docs) < 0)):
            raise DataError(f"{path}: document index is not a non-decreasing run from 0 to the sequence count")

    def _check_bin(self, path: str) -> None:
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        size = os.path.getsize(path)
        if size != self.num_tokens * self.dtype.itemsize:
            raise DataError(
                f"{path}: .bin is {size} bytes but the index describes {self.num_tokens} tokens of "
                f"{self.dtype} ({self.num_tokens * self.dtype.itemsize} bytes)"
            )
        # np.memmap refuses empty files; an empty dataset simply has no tokens to map.
        self._bin = np.memmap(path, mode="r", dtype=self.dtype) if size else np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence i."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        n = int(self.sequence_lengths[i]) - offset if length is None else length
        return self._bin[start:start + n]

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({len(self)} sequences)")
        return self.get(i % len(self))

    def check_vocab(self, vocab_size: int, chunk_tokens: int = 1 << 24) -> None:
        """Refuse token ids outside [0, vocab_size). Scans the .bin in chunks (one pass, bounded memory)."""
        for start in range(0, len(self._bin), chunk_tokens):
            chunk = self._bin[start:start + chunk_tokens]
            lo, hi = chunk.min(), chunk.max()
            if lo < 0 or hi >= vocab_size:
                bad = int(hi) if hi >= vocab_size else int(lo)
                raise DataError(
                    f"{data_file_path(self.prefix)}: token id {bad} is outside the tokenizer's vocabulary "
                    f"(size {vocab_size})"
                )
