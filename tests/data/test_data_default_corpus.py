"""The default job's corpus: built once even when callers race, faithful to the source texts, blended."""

import importlib.util
import json
import os
import threading

import numpy as np
import pytest

from megatron_est.data.builder import build_train_valid_test_datasets
from megatron_est.data.corpus import shakespeare_files, wikipedia_articles
from megatron_est.data.default_corpus import prepare_default_corpus
from megatron_est.data.indexed_dataset import IndexedDataset
from megatron_est.data.tokenizers import build_tokenizer

HAVE_GENSIM = importlib.util.find_spec("gensim") is not None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    results = []
    racers = [threading.Thread(target=lambda: results.append(prepare_default_corpus(cache))) for _ in range(2)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    return cache, results[0]


def test_built_once_and_cached(corpus):
    cache, (data_path, model) = corpus
    root = os.path.dirname(model)
    files = sorted(f for f in os.listdir(root) if not f.startswith(".lock"))
    assert not [f for f in files if f.startswith(".")]  # no temporaries left by either racer
    stamps = {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in files}
    assert prepare_default_corpus(cache) == (data_path, model)
    assert stamps == {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in files}  # nothing rebuilt


def test_shakespeare_documents_are_the_plays(corpus):
    _, (data_path, model) = corpus
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    ds = IndexedDataset(data_path[1] if len(data_path) > 1 else data_path[0])
    files = shakespeare_files()
    assert ds.num_documents == len(files) == 42
    for i in (0, 17, 41):
        assert ds[i][-1] == tok.eod
        assert tok.decode(ds[i][:-1].tolist()) == open(files[i], encoding="utf-8").read()


@pytest.mark.skipif(not HAVE_GENSIM, reason="gensim (the Wikipedia excerpt) is not installed")
def test_wikipedia_source_and_blend(corpus):
    cache, (data_path, model) = corpus
    assert data_path[0] == 0.7 and data_path[2] == 0.3
    wiki = IndexedDataset(data_path[3])
    rows = [json.loads(line) for line in open(os.path.join(os.path.dirname(model), "wikipedia.jsonl"))]
    assert wiki.num_documents == len(rows) == len(wikipedia_articles()) > 100
    assert not any("{{" in r["text"] or "[[" in r["text"] for r in rows)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    assert tok.decode(wiki[3][:-1].tolist()) == rows[3]["text"]
    tr, va, te = build_train_valid_test_datasets(data_path, "969,30,1", 128, 1234, (3000, 100, 10),
                                                 os.path.join(cache, "index"), vocab_size=tok.vocab_size)
    assert len(tr) == 3000 and len(va) == 100 and len(te) == 10
    share = np.bincount(tr.dataset_index, minlength=2) / len(tr)
    assert abs(share[0] - 0.7) < 0.01
    assert tr[0]["tokens"].shape == (129,) and int(tr[0]["tokens"].max()) < tok.vocab_size
