"""GPT samples: epoch coverage, determinism, caching, splits, blending, rank-0-builds under torch.distributed."""

import os

import numpy as np
import pytest
import torch

from megatron_est.data.builder import build_train_valid_test_datasets, parse_split, split_document_ranges
from megatron_est.data.errors import DataError
from megatron_est.data.gpt_dataset import GPTDataset
from megatron_est.data.indexed_dataset import IndexedDataset, write_indexed_dataset


def _unique_token_dataset(path, n_docs=40, seed=0):
    """Documents whose tokens are all distinct (their global position), so coverage can be checked exactly."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 120, n_docs)
    lengths[min(5, n_docs - 1)] = 0  # an empty document must not break the sample index
    starts = np.concatenate([[0], np.cumsum(lengths)])
    write_indexed_dataset(path, [np.arange(starts[i], starts[i + 1]) for i in range(n_docs)], np.int32)
    return path, int(lengths.sum())


def test_one_epoch_covers_every_token_once(tmp_path):
    prefix, total = _unique_token_dataset(str(tmp_path / "u"))
    seq = 16
    per_epoch = (total - 1) // seq
    ds = GPTDataset(IndexedDataset(prefix), "train", (0, 40), seq, 7, per_epoch, None)
    assert len(ds) == per_epoch and ds.spec.num_epochs == 1
    samples = [ds[i]["tokens"].numpy() for i in range(len(ds))]
    assert all(s.shape == (seq + 1,) and s.dtype == np.int64 for s in samples)
    inputs = np.concatenate([s[:-1] for s in samples])  # the last token of each window is the next's first
    assert len(np.unique(inputs)) == len(inputs)  # no token twice...
    assert total - len(inputs) <= seq  # ...and only the final partial window is missing
    # Windows are contiguous runs of the shuffled document stream: each token's label is its stream successor.
    stream = np.concatenate([IndexedDataset(prefix)[int(d)] for d in ds.document_index])
    successor = dict(zip(stream[:-1], stream[1:]))
    assert all(successor[a] == b for s in samples for a, b in zip(s[:-1], s[1:]))
    assert sorted(set(stream[: len(inputs)])) == sorted(inputs)


def test_many_epochs_and_last_epoch_last(tmp_path):
    prefix, total = _unique_token_dataset(str(tmp_path / "u"))
    seq = 32
    want = 3 * total // seq + 5  # needs 4 epochs (3 full + part of a 4th)
    ds = GPTDataset(IndexedDataset(prefix), "train", (0, 40), seq, 1, want, None)
    assert ds.spec.num_epochs == 4 and len(ds) >= want
    counts = np.bincount(np.concatenate([ds[i]["tokens"].numpy()[:-1] for i in range(len(ds))]), minlength=total)
    assert counts.max() <= 4 and (counts >= 3).mean() > 0.95
    # The first three epochs' samples come first: after them every token has been seen about three times.
    early = np.bincount(np.concatenate([ds[i]["tokens"].numpy()[:-1] for i in range(3 * total // seq - 2)]),
                        minlength=total)
    assert early.max() <= 4 and (early >= 2).all()


def test_same_seed_same_samples_other_seed_other(tmp_path):
    prefix, _ = _unique_token_dataset(str(tmp_path / "u"))

    def build(seed, cache):
        tr, va, te = build_train_valid_test_datasets([prefix], "80,10,10", 16, seed, (300, 20, 20), cache)
        return [np.stack([d[i]["tokens"].numpy() for i in range(len(d))]) for d in (tr, va, te)]

    a, b = build(3, None), build(3, str(tmp_path / "cache"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = build(4, None)
    assert not np.array_equal(a[0], c[0])
    # The three splits draw on disjoint documents.
    assert not set(a[0][:, :-1].ravel()) & set(a[1][:, :-1].ravel())


def test_cache_is_built_once_and_reused(tmp_path):
    prefix, _ = _unique_token_dataset(str(tmp_path / "u"))
    cache = str(tmp_path / "cache")
    first = GPTDataset(IndexedDataset(prefix), "train", (0, 40), 16, 1, 100, cache)
    assert first.built_here and sorted(os.listdir(cache)) == [os.path.basename(first.cache_path)]
    assert sorted(os.listdir(first.cache_path)) == ["document_index.npy", "sample_index.npy", "shuffle_index.npy", "spec.json"]
    second = GPTDataset(IndexedDataset(prefix), "train", (0, 40), 16, 1, 100, cache)
    assert not second.built_here and np.array_equal(first.tokens(5), second.tokens(5))
    other = GPTDataset(IndexedDataset(prefix), "train", (0, 40), 16, 2, 100, cache)  # new seed: new entry
    assert other.built_here and len(os.listdir(cache)) == 2
    with pytest.raises(DataError, match="was not built by rank 0"):
        GPTDataset(IndexedDataset(prefix), "train", (0, 40), 16, 3, 100, cache, build=False)


def test_failed_cache_write_leaves_no_entry(tmp_path, monkeypatch):
    prefix, _ = _unique_token_dataset(str(tmp_path / "u"))
    cache = tmp_path / "cache"
    real_save, calls = np.save, []

    def failing_save(path, arr):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(path, arr)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        GPTDataset(IndexedDataset(prefix), "train", (0, 40), 16, 1, 100, str(cache))
    assert os.listdir(cache) == []  # neither a half entry nor its temporary directory
    monkeypatch.setattr(np, "save", real_save)
    assert GPTDataset(IndexedDataset(prefix), "train", (0, 40), 16, 1, 100, str(cache)).built_here


def test_split_ranges():
    assert split_document_ranges(1000, parse_split("969,30,1")) == [(0, 969), (969, 999), (999, 1000)]
    # Small corpora still get a validation and a test document; a zero-weight split gets none.
    assert split_document_ranges(42, parse_split("969,30,1")) == [(0, 40), (40, 41), (41, 42)]
    assert split_document_ranges(10, parse_split("100,0,0")) == [(0, 10), (10, 10), (10, 10)]
    assert split_document_ranges(10, parse_split("98/2")) == [(0, 9), (9, 10), (10, 10)]
    for bad in ("a,b", "1,2,3,4", "-1,2", "0,0,0"):
        with pytest.raises(DataError, match="--split"):
            parse_split(bad)


def test_blend_proportions_and_determinism(tmp_path):
    a, _ = _unique_token_dataset(str(tmp_path / "a"), seed=1)
    b, _ = _unique_token_dataset(str(tmp_path / "b"), n_docs=15, seed=2)
    c, _ = _unique_token_dataset(str(tmp_path / "c"), n_docs=25, seed=3)
    data_path = [0.5, a, 0.3, b, 0.2, c]
    tr, va, _ = build_train_valid_test_datasets(data_path, "90,10,0", 16, 5, (2000, 100, 0), str(tmp_path / "cache"))
    assert len(tr) == 2000 and len(va) == 100
    for n in (10, 100, 2000):  # proportions hold for every prefix of training, within a sample or two
        counts = np.bincount(tr.dataset_index[:n], minlength=3)
        assert np.all(np.abs(counts - n * np.array([0.5, 0.3, 0.2])) <= 1.5), (n, counts)
    # Each blended sample is a real sample of its component.
    for i in (0, 7, 1999):
        d, j = int(tr.dataset_index[i]), int(tr.sample_index[i])
        assert torch.equal(tr[i]["tokens"], tr.datasets[d][j]["tokens"])
    again, _, _ = build_train_valid_test_datasets(data_path, "90,10,0", 16, 5, (2000, 100, 0), None)
    assert all(torch.equal(tr[i]["tokens"], again[i]["tokens"]) for i in range(0, 2000, 37))


def test_bad_data_path_and_empty_split(tmp_path):
    prefix, _ = _unique_token_dataset(str(tmp_path / "u"), n_docs=3)
    with pytest.raises(DataError, match="--data-path: 'x' is not a weight"):
        build_train_valid_test_datasets(["x", prefix, 0.5, prefix], "1", 8, 1, (1, 0, 0), None)
    with pytest.raises(DataError, match="--data-path: expected one prefix or weight/prefix pairs"):
        build_train_valid_test_datasets([0.5, prefix, 0.5], "1", 8, 1, (1, 0, 0), None)
    with pytest.raises(DataError, match=r"not found: .*missing\.idx"):
        build_train_valid_test_datasets([str(tmp_path / "missing")], "1", 8, 1, (1, 0, 0), None)
    with pytest.raises(DataError, match="--split: the test split of .* has no documents but 5 samples"):
        build_train_valid_test_datasets([prefix], "1,0,0", 8, 1, (10, 0, 5), None)
    tr, va, te = build_train_valid_test_datasets([prefix], "1,0,0", 8, 1, (10, 0, 0), None)
    assert len(tr) >= 10 and va is None and te is None
    with pytest.raises(DataError, match=r"u\.bin: token id \d+ is outside the tokenizer's vocabulary \(size 50\)"):
        build_train_valid_test_datasets([prefix], "1", 8, 1, (10, 0, 0), None, vocab_size=50)


def _distributed_worker(rank, prefix, cache, out, port):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tr, _, _ = build_train_valid_test_datasets([prefix], "90,10,0", 16, 9, (200, 10, 0), cache)
    np.save(f"{out}/rank{rank}.npy", np.stack([tr[i]["tokens"].numpy() for i in range(200)]))
    np.save(f"{out}/built{rank}.npy", np.array(tr.built_here))
    try:  # an error on rank 0 reaches every rank, one line, nobody hangs
        build_train_valid_test_datasets([prefix + "_missing"], "1", 16, 9, (1, 0, 0), cache)
    except Exception as e:
        with open(f"{out}/error{rank}.txt", "w") as f:
            f.write(f"{type(e).__name__}: {e}")
    dist.destroy_process_group()


def test_rank0_builds_others_load(tmp_path):
    import socket

    prefix, _ = _unique_token_dataset(str(tmp_path / "u"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(
        _distributed_worker, args=(prefix, str(tmp_path / "cache"), str(tmp_path), port), nprocs=2,
        start_method="spawn")
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    assert np.array_equal(r0, r1)
    assert bool(np.load(tmp_path / "built0.npy")) and not bool(np.load(tmp_path / "built1.npy"))
    for rank in (0, 1):
        msg = (tmp_path / f"error{rank}.txt").read_text()
        assert msg.startswith("DataError") and "u_missing.idx" in msg and "\n" not in msg
