"""An opt-in corpus for long runs, so they repeat their data less than on Shakespeare alone: Shakespeare (42
plays), the U.S. presidential annual messages (249, 1790-2025) and the King James Bible (66 books), about 21.6 MB
of public-domain English from three pip packages (docs/data.md). The default job does not use it.

One SentencePiece vocabulary (the default corpus's recipe) is trained on all of it. The documents are written in
one fixed shuffled order: --split takes contiguous document ranges, so the validation range then draws on all
three sources. The Wikipedia excerpt, tokenized with the same vocabulary, stays a held-out domain.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

from .corpus import kjv_books, shakespeare_files, sotu_files, wikipedia_articles
from .default_corpus import _file_lock, _have, _wikipedia_available, _write_jsonl
from .preprocess import output_prefix_for, preprocess
from .tokenizers import train_sentencepiece

FORMAT = "long-v1"  # bump when the recipe below changes, so old caches are not reused
SHUFFLE_SEED = 1234  # the document order; part of the recipe


@dataclass(frozen=True)
class LongCorpus:
    train: str  # dataset prefix for --data-path (split it with --split)
    wikipedia: Optional[str]  # held-out prefix for --extra-valid-data-path (None without gensim)
    tokenizer_model: str


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def long_documents() -> list[dict[str, str]]:
    """All documents ({"title", "text"}) in the corpus's fixed order."""
    docs = [{"title": os.path.basename(p), "text": _read(p)} for p in shakespeare_files() + sotu_files()]
    docs += kjv_books()
    random.Random(SHUFFLE_SEED).shuffle(docs)
    return docs


def prepare_long_corpus(cache_dir: str, vocab_size: int = 1024) -> LongCorpus:
    """Build once under cache_dir/long_corpus/ (a file lock makes concurrent callers wait); reruns only look."""
    root = os.path.join(cache_dir, "long_corpus", f"{FORMAT}-spm{vocab_size}")
    model = os.path.join(root, f"long_spm{vocab_size}.model")
    train = output_prefix_for(os.path.join(root, "long"), "text")
    wiki = output_prefix_for(os.path.join(root, "wikipedia"), "text") if _wikipedia_available() else None
    if os.path.isfile(model) and _have(train) and (wiki is None or _have(wiki)):
        return LongCorpus(train, wiki, model)
    os.makedirs(root, exist_ok=True)
    with _file_lock(os.path.join(root, ".lock")):
        jsonl = os.path.join(root, "long.jsonl")
        if not os.path.isfile(jsonl):
            _write_jsonl(jsonl, long_documents())
        if not os.path.isfile(model):
            text = os.path.join(root, "long_spm_input.txt")  # the same text, as lines for the trainer
            with open(text, "w", encoding="utf-8") as f:
                f.writelines(doc["text"] + "\n" for doc in long_documents())
            train_sentencepiece([text], model[: -len(".model")], vocab_size)
            os.remove(text)
        common = dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=model, append_eod=True, progress=False)
        if not _have(train):
            preprocess(jsonl, os.path.join(root, "long"), **common)
        if wiki is not None and not _have(wiki):
            wiki_jsonl = os.path.join(root, "wikipedia.jsonl")
            if not os.path.isfile(wiki_jsonl):
                _write_jsonl(wiki_jsonl, wikipedia_articles())
            preprocess(wiki_jsonl, os.path.join(root, "wikipedia"), **common)
    return LongCorpus(train, wiki, model)
