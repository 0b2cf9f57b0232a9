"""Tokenize local files (jsonl, text, parquet, or a saved Hugging Face dataset) into indexed datasets.

The `datasets` library reads the input (memory-mapped Arrow, any size); worker processes tokenize batches of
documents and return compact token arrays; the main process streams them into the .bin in input order. The
output is {output_prefix}_{key}_document.bin/.idx per JSON key, as Megatron names it.

Nothing is left behind: an error or an interrupt (tools/preprocess_data.py turns SIGTERM and SIGHUP into one)
removes the temporary Arrow cache and the half-written .bin/.idx. A run killed outright (SIGKILL, a node lost)
cannot clean up, so each run first removes what such a run left in its output folder: cache folders named
.hf-cache-HOST-PID-* whose process is gone from this host, and, when no live run owns a cache folder there,
the writers' temporary files of this run's own output prefixes.
"""

from __future__ import annotations

import collections
import glob
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError
from .indexed_dataset import IndexedDatasetWriter, smallest_token_dtype
from .tokenizers import Tokenizer, build_tokenizer

FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text", ".parquet": "parquet"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class PreprocessResult:
    prefixes: dict[str, str]  # json key -> output prefix (for --data-path)
    documents: int
    tokens: int
    seconds: float
    skipped_empty: int = 0
    inputs: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Comma-separated paths and globs, each expanded in sorted order; a saved dataset folder stays whole."""
    items = inputs.split(",") if isinstance(inputs, str) else [p for item in inputs for p in item.split(",")]
    paths: list[str] = []
    for item in (i.strip() for i in items if i.strip()):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise DataError(f"--input: no such file: {item}")
        paths += matches
    if not paths:
        raise DataError("--input: no input files given")
    return paths


def input_format(path: str) -> str:
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json")):
            return "saved"
        raise DataError(f"--input: {path} is a folder but not a dataset saved with save_to_disk")
    name = path
    for ext in COMPRESSION:
        name = name.removesuffix(ext)
    fmt = FORMATS.get(os.path.splitext(name)[1].lower())
    if fmt is None:
        raise DataError(f"--input: cannot tell the format of {path} (expected .jsonl, .json, .txt, .parquet or a saved dataset folder)")
    if os.path.getsize(path) == 0:
        raise DataError(f"--input: {path} is empty")
    return fmt


def load_documents(paths: list[str], json_keys: Sequence[str], text_sample_by: str, hf_cache_dir: str):
    """One datasets.Dataset with the json_keys columns of all inputs, in input order."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach for the hub
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as one DataError line
    parts = []
    for path in paths:
        fmt = input_format(path)
        try:
            if fmt == "saved":
                ds = datasets.load_from_disk(path)
                if isinstance(ds, datasets.DatasetDict):
                    if len(ds) != 1 and "train" not in ds:
                        raise DataError(f"--input: {path} holds splits {list(ds)}; save one split or a 'train' split")
                    ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            elif fmt == "text":
                ds = datasets.load_dataset("text", data_files=[path], split="train", sample_by=text_sample_by,
                                           keep_linebreaks=True, cache_dir=hf_cache_dir)
            else:
                ds = datasets.load_dataset(fmt, data_files=[path], split="train", cache_dir=hf_cache_dir)
        except DataError:
            raise
        except Exception as e:  # datasets wraps the parser's error; the innermost one says what is wrong
            while e.__cause__ is not None:
                e = e.__cause__
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"--input: cannot read {path}: {first}") from None
        missing = [k for k in json_keys if k not in ds.column_names]
        if missing:
            raise DataError(f"--json-keys: {path} has no column {missing[0]!r} (columns: {', '.join(ds.column_names)})")
        parts.append(ds.select_columns(list(json_keys)))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# --- worker side: one tokenizer per process, built once ---------------------------------------------------
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_args: dict) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes, not threads, are the parallelism
    _worker_tokenizer = build_tokenizer(**tokenizer_args)


def _encode_batch(batch: dict[str, list], keys: Sequence[str], append_eod: bool, dtype: str) -> dict[str, tuple]:
    """Per key: (concatenated tokens, per-document lengths, max id). Empty documents get length -1 (skipped)."""
    tok = _worker_tokenizer
    out = {}
    for key in keys:
        texts = [t if isinstance(t, str) else ("" if t is None else str(t)) for t in batch[key]]
        ids = tok.encode_batch(texts)
        if append_eod:
            ids = [seq + [tok.eod] if text else seq for seq, text in zip(ids, texts)]
        lengths = np.array([len(seq) if text else -1 for seq, text in zip(ids, texts)], dtype=np.int64)
        flat = np.fromiter((i for seq in ids for i in seq), dtype=np.int64, count=int(lengths.clip(0).sum()))
        top = int(flat.max()) if flat.size else -1
        if flat.size and flat.min() < 0:
            top = int(flat.min())
        out[key] = (flat.astype(dtype), lengths, top)
    return out


def _batches(ds, batch_size: int, keys: Sequence[str], max_chars: int = 1 << 20) -> Iterator[dict[str, list]]:
    """Up to batch_size documents and about max_chars characters per batch: long documents (whole books) come
    in small batches, so the work spreads evenly over the workers."""
    for start in range(0, len(ds), batch_size):
        block = ds[start:start + batch_size]
        sizes = np.zeros(len(block[keys[0]]), dtype=np.int64)
        for key in keys:
            sizes += [len(t) if isinstance(t, str) else 0 for t in block[key]]
        lo, total = 0, 0
        for i, n in enumerate(sizes):
            if total and total + n > max_chars:
                yield {k: v[lo:i] for k, v in block.items()}
                lo, total = i, 0
            total += n
        yield {k: v[lo:] for k, v in block.items()}


def _encoded_batches(ds, batch_size: int, workers: int, tokenizer: Tokenizer, tokenizer_args: dict, keys,
                     append_eod, dtype):
    """Encoded batches in input order; at most 4 batches per worker in flight to bound memory."""
    global _worker_tokenizer
    if workers <= 1:
        _worker_tokenizer = tokenizer  # in this process: no pool to start
        for batch in _batches(ds, batch_size, keys):
            yield _encode_batch(batch, keys, append_eod, dtype)
        return
    # spawn, not fork: the caller may be a training process whose threads make fork unsafe.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_args,)) as pool:
        pending: collections.deque = collections.deque()
        for batch in _batches(ds, batch_size, keys):
            pending.append(pool.apply_async(_encode_batch, (batch, keys, append_eod, dtype)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(
    inputs: str | Sequence[str],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    batch_size: int = 256,
    text_sample_by: str = "document",
    progress: bool = True,
) -> PreprocessResult:
    """Tokenize inputs into {output_prefix}_{key}_document.bin/.idx; nothing is left half-written on error."""
    start = time.perf_counter()
    tokenizer_args = dict(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                          vocab_file=vocab_file, merge_file=merge_file)
    tokenizer = build_tokenizer(**tokenizer_args)  # fail fast on a bad tokenizer, before reading any data
    if text_sample_by not in ("document", "paragraph", "line"):
        raise DataError(f"--text-sample-by: {text_sample_by!r} is not one of document, paragraph, line")
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    paths = expand_inputs(inputs)
    dtype = smallest_token_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    prefixes = {k: output_prefix_for(output_prefix, k) for k in json_keys}
    remove_stale_files(out_dir, prefixes.values())
    # the Arrow copy of the input, removed after; host and pid in the name tell a later run whether it is stale
    hf_cache = tempfile.mkdtemp(prefix=f"{_CACHE_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=out_dir)
    writers: dict[str, IndexedDatasetWriter] = {}
    documents = skipped = 0
    try:
        for k, p in prefixes.items():  # inside the try: an interrupt now still aborts the ones made
            writers[k] = IndexedDatasetWriter(p, dtype)
        ds = load_documents(paths, json_keys, text_sample_by, hf_cache)
        bar = _progress_bar(len(ds), progress)
        for encoded in _encoded_batches(ds, batch_size, workers, tokenizer, tokenizer_args, list(json_keys), append_eod, dtype.str):
            n = 0
            for key, (flat, lengths, top) in encoded.items():
                if top >= tokenizer.vocab_size or top < -1:
                    raise DataError(f"--tokenizer-type {tokenizer_type}: produced token id {top} outside its vocabulary (size {tokenizer.vocab_size})")
                _write_batch(writers[key], flat, lengths)
                n = len(lengths)
            empty = int((next(iter(encoded.values()))[1] < 0).sum())
            documents, skipped = documents + n - empty, skipped + empty
            bar.update(n)
        bar.close()
        if documents == 0:
            raise DataError(f"--input: no non-empty documents in {', '.join(paths)}")
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        shutil.rmtree(hf_cache, ignore_errors=True)
    tokens = sum(w.num_tokens for w in writers.values())
    return PreprocessResult(prefixes, documents, tokens, time.perf_counter() - start, skipped, paths)


_CACHE_PREFIX = ".hf-cache-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _cache_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a cache folder this module made (.hf-cache-HOST-PID-random), None for any other name."""
    parts = name[len(_CACHE_PREFIX):].rsplit("-", 2)
    if not name.startswith(_CACHE_PREFIX) or len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def remove_stale_files(out_dir: str, prefixes) -> list[str]:
    """Remove what a killed run left in out_dir (see the module docstring); returns the paths removed."""
    host, removed, live_run = socket.gethostname(), [], False
    for name in os.listdir(out_dir):
        owner = _cache_owner(name)
        if owner is None:
            continue
        if owner[0] == host and not _alive(owner[1]):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
            removed.append(os.path.join(out_dir, name))
        else:
            live_run = True  # running here, or on another host: its temporary files may be in use
    if not live_run:
        for prefix in prefixes:  # IndexedDatasetWriter's temporaries: .{base}.XXXX.bin.tmp / .idx.tmp
            base = os.path.basename(prefix)
            for path in glob.glob(os.path.join(out_dir, glob.escape(f".{base}.") + "*.tmp")):
                if path.endswith((".bin.tmp", ".idx.tmp")):
                    os.unlink(path)
                    removed.append(path)
    return removed


def _write_batch(writer: IndexedDatasetWriter, flat: np.ndarray, lengths: np.ndarray) -> None:
    offset = 0
    for n in lengths:
        if n < 0:
            continue  # an empty document: nothing to learn from, and no lone end-of-document token
        writer.add_document(flat[offset:offset + n])
        offset += n


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="doc", disable=not enabled, file=sys.stderr, dynamic_ncols=True)
