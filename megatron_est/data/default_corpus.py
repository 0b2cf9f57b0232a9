"""The default job's data, built once: Shakespeare (and a Wikipedia excerpt) as indexed datasets."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import warnings
from collections.abc import Iterator

from .corpus import shakespeare_files, wikipedia_articles
from .errors import DataError
from .indexed_dataset import data_file_path, index_file_path
from .preprocess import output_prefix_for, preprocess
from .tokenizers import train_sentencepiece

FORMAT = "v2"  # bump when the recipe below changes, so old caches are not reused
DEFAULT_WEIGHTS = (0.7, 0.3)  # Shakespeare, Wikipedia
VOCAB_SIZE = 8192  # the default job's sentencepiece vocabulary


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive lock between processes on this machine (flock; released if the holder dies)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _have(prefix: str) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


def _write_jsonl(path: str, rows: list[dict[str, str]]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _wikipedia_available() -> bool:
    try:
        from .corpus import wikipedia_dump_path

        wikipedia_dump_path()
        return True
    except DataError as e:
        warnings.warn(f"default corpus: Shakespeare only ({e})", stacklevel=3)
        return False


def tokenizer_model_path(cache_dir: str, vocab_size: int = VOCAB_SIZE) -> str:
    """Where the default corpus keeps its sentencepiece model (whether or not it is built yet)."""
    return os.path.join(cache_dir, "default_corpus", f"{FORMAT}-spm{vocab_size}", f"shakespeare_spm{vocab_size}.model")


def prepare_default_corpus(cache_dir: str, vocab_size: int = VOCAB_SIZE) -> tuple[list, str]:
    """(data_path, tokenizer model): a Megatron-style blend [0.7, shakespeare, 0.3, wikipedia] and the
    sentencepiece model trained on Shakespeare that tokenized it.

    Each play is one document, each Wikipedia article one, with an end-of-document token appended. Built
    under cache_dir once; concurrent callers on one machine wait on a file lock and then reuse the result.
    Without gensim installed the Wikipedia source is left out and data_path is [shakespeare].
    """
    model = tokenizer_model_path(cache_dir, vocab_size)
    root = os.path.dirname(model)
    shakespeare = output_prefix_for(os.path.join(root, "shakespeare"), "text")
    wikipedia = output_prefix_for(os.path.join(root, "wikipedia"), "text")
    use_wiki = _wikipedia_available()

    def result() -> tuple[list, str]:
        if use_wiki:
            return [DEFAULT_WEIGHTS[0], shakespeare, DEFAULT_WEIGHTS[1], wikipedia], model
        return [shakespeare], model

    if os.path.isfile(model) and _have(shakespeare) and (_have(wikipedia) or not use_wiki):
        return result()  # fast path: no lock needed to read finished files
    os.makedirs(root, exist_ok=True)
    with _file_lock(os.path.join(root, ".lock")):
        if not os.path.isfile(model):
            train_sentencepiece(shakespeare_files(), model[: -len(".model")], vocab_size)
        common = dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=model, append_eod=True, progress=False)
        if not _have(shakespeare):
            preprocess(shakespeare_files(), os.path.join(root, "shakespeare"), text_sample_by="document", **common)
        if use_wiki and not _have(wikipedia):
            jsonl = os.path.join(root, "wikipedia.jsonl")
            if not os.path.isfile(jsonl):
                _write_jsonl(jsonl, wikipedia_articles())
            preprocess(jsonl, os.path.join(root, "wikipedia"), **common)
    return result()
