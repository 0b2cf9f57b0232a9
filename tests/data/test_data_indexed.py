"""Indexed dataset: round-trip, the exact MMIDIDX byte layout, and refusal of damaged files."""

import os
import struct

import numpy as np
import pytest

from megatron_est.data.errors import DataError
from megatron_est.data.indexed_dataset import (
    IndexedDataset, IndexedDatasetWriter, smallest_token_dtype, write_indexed_dataset,
)


def _docs(n=30, vocab=50000, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(1, 200))) for _ in range(n)]


def test_round_trip(tmp_path):
    docs = _docs()
    write_indexed_dataset(str(tmp_path / "d"), docs, np.uint16)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == ds.num_documents == len(docs)
    assert ds.dtype == np.uint16 and ds.num_tokens == sum(len(d) for d in docs)
    for got, want in zip(ds, docs):
        assert np.array_equal(got, want)
    assert np.array_equal(ds.get(3, 2, 5), docs[3][2:7])


def test_idx_bytes_follow_the_layout(tmp_path):
    docs = [[5, 6, 7], [8], [9, 10]]
    with IndexedDatasetWriter(str(tmp_path / "d"), np.int32) as w:
        w.add_sequence(docs[0])  # a document of two sequences, then one of one
        w.add_sequence(docs[1])
        w.end_document()
        w.add_document(docs[2])
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", raw, 9) == (1,)  # version
    assert raw[17] == 4  # dtype code: int32
    assert struct.unpack_from("<QQ", raw, 18) == (3, 3)  # sequences; document index length (documents + 1)
    off = 34
    assert struct.unpack_from("<3i", raw, off) == (3, 1, 2)  # int32 sequence lengths
    assert struct.unpack_from("<3q", raw, off + 12) == (0, 12, 16)  # int64 byte pointers
    assert struct.unpack_from("<3q", raw, off + 36) == (0, 2, 3)  # int64 document index
    assert len(raw) == off + 60
    assert (tmp_path / "d.bin").read_bytes() == np.array([5, 6, 7, 8, 9, 10], dtype="<i4").tobytes()
    ds = IndexedDataset(str(tmp_path / "d"))
    assert ds.num_documents == 2 and list(ds.document_indices) == [0, 2, 3]


def test_megatron_dtype_codes_and_smallest_dtype(tmp_path):
    for dtype, code in [(np.uint8, 1), (np.int8, 2), (np.int16, 3), (np.int32, 4), (np.int64, 5),
                        (np.float64, 6), (np.float32, 7), (np.uint16, 8)]:
        write_indexed_dataset(str(tmp_path / "c"), [[1, 2]], dtype)
        assert (tmp_path / "c.idx").read_bytes()[17] == code
        assert IndexedDataset(str(tmp_path / "c")).dtype == dtype
    assert [smallest_token_dtype(v) for v in (256, 257, 50257, 65536, 65537, 128256)] == [
        np.uint8, np.uint16, np.uint16, np.uint16, np.int32, np.int32]


@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "g")
    write_indexed_dataset(prefix, _docs(10), np.uint16)
    return prefix


def _damage(path, data):
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("case, pattern", [
    ("no_idx", r"not found: .*g\.idx"),
    ("no_bin", r"not found: .*g\.bin"),
    ("truncated_idx", r"g\.idx: index is \d+ bytes but its header implies"),
    ("short_header", r"g\.idx: not an MMIDIDX index"),
    ("bad_magic", r"g\.idx: not an MMIDIDX index"),
    ("bad_version", r"g\.idx: unsupported index version 2"),
    ("bad_dtype", r"g\.idx: unknown dtype code 9"),
    ("bad_pointer", r"g\.idx: sequence pointers disagree"),
    ("bad_doc_index", r"g\.idx: document index is not"),
    ("short_bin", r"g\.bin: \.bin is \d+ bytes but the index describes"),
    ("long_bin", r"g\.bin: \.bin is \d+ bytes but the index describes"),
])
def test_damaged_files_are_refused(good, case, pattern):
    idx, bin_ = good + ".idx", good + ".bin"
    raw, data = open(idx, "rb").read(), open(bin_, "rb").read()
    n = 10
    if case == "no_idx":
        os.unlink(idx)
    elif case == "no_bin":
        os.unlink(bin_)
    elif case == "truncated_idx":
        _damage(idx, raw[:-5])
    elif case == "short_header":
        _damage(idx, raw[:20])
    elif case == "bad_magic":
        _damage(idx, b"MMIDIDY" + raw[7:])
    elif case == "bad_version":
        _damage(idx, raw[:9] + struct.pack("<Q", 2) + raw[17:])
    elif case == "bad_dtype":
        _damage(idx, raw[:17] + b"\x09" + raw[18:])
    elif case == "bad_pointer":
        off = 34 + 4 * n + 8  # second pointer
        _damage(idx, raw[:off] + struct.pack("<q", 7) + raw[off + 8:])
    elif case == "bad_doc_index":
        _damage(idx, raw[:-8] + struct.pack("<q", n + 1))
    elif case == "short_bin":
        _damage(bin_, data[:-2])
    elif case == "long_bin":
        _damage(bin_, data + b"\x00\x00")
    with pytest.raises(DataError, match=pattern) as e:
        IndexedDataset(good)
    assert "\n" not in str(e.value)


def test_vocab_check(good):
    ds = IndexedDataset(good)
    ds.check_vocab(50000)
    with pytest.raises(DataError, match=r"g\.bin: token id \d+ is outside the tokenizer's vocabulary \(size 100\)"):
        ds.check_vocab(100)


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    write_indexed_dataset(str(tmp_path / "x"), [[1, 2, 3]], np.uint16)
    assert sorted(os.listdir(tmp_path)) == ["x.bin", "x.idx"]
