"""Our tokenizers as Hugging Face fast tokenizers (tokenizer.json): loadable without sentencepiece or protobuf.

GPT-2 BPE: our own `tokenizers` pipeline, with <|endoftext|> registered as a special token (Hugging Face users
expect the eos text to map to its id; our training encodes that text as plain bytes, but corpus text never
contains it). SentencePiece BPE: rebuilt from the processor's pieces and scores - a BPE model whose merge ranks
follow the piece scores (sentencepiece merges the adjacent pair whose result scores highest, leftmost first;
`tokenizers` merges the lowest rank, leftmost first), byte fallback, and a normalizer read off the processor's own
normalize() (dummy prefix, whitespace handling, NFKC) rather than its protobuf. Neither pipeline adds a BOS:
training put none before a document (documents are separated by the end-of-document token).
"""
from __future__ import annotations

import json
import os

from megatron_est.config import ConfigError

SPACE = "\u2581"  # sentencepiece's visible space


def spm_backend(sp):
    """A `tokenizers.Tokenizer` that encodes and decodes exactly as sentencepiece processor `sp` (BPE models)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    specials = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    mergeable = {sp.id_to_piece(i): i for i in range(n)
                 if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    unk = sp.unk_id()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(sp, mergeable), byte_fallback=True, fuse_unk=True,
                               unk_token=sp.id_to_piece(unk) if unk >= 0 else None))
    tok.normalizer = _spm_normalizer(sp)
    strip_prefix = sp.normalize("a").startswith(SPACE)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if strip_prefix else []))
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in specials])
    return tok


def _spm_merges(sp, mergeable: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two mergeable pieces, ranked by the score of the merged piece (then id)."""
    ranked = []
    for piece, pid in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-sp.get_score(pid), pid, mergeable[left], (left, right)))
    ranked.sort()
    return [pair for *_, pair in ranked]


def _spm_normalizer(sp):
    """The processor's text normalization, probed through normalize() on inputs that tell the options apart."""
    from tokenizers import Regex, normalizers

    steps = [normalizers.Replace(c, to) for c, to in _control_rules(sp)]
    if "\uff41" not in sp.normalize("\uff41"):  # a full-width letter folded: an NFKC rule (not identity)
        steps.append(normalizers.NFKC())
    if sp.normalize(" a  b ").strip(SPACE) == "a" + SPACE + "b":  # remove_extra_whitespaces: trim, collapse runs
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if sp.normalize("a").startswith(SPACE):  # add_dummy_prefix
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def _control_rules(sp) -> list[tuple[str, str]]:
    """Control characters the normalizer turns into a space or drops (NMT rules map tabs and newlines to spaces)."""
    space, gone = sp.normalize("a b"), sp.normalize("ab")
    rules = []
    for c in [chr(i) for i in range(32)] + ["\x7f"]:
        got = sp.normalize(f"a{c}b")
        if got != space and got == gone:
            rules.append((c, ""))
        elif got == space:
            rules.append((c, " "))
    return rules


def backend_of(tok):
    """The `tokenizers` pipeline of one of our tokenizers (megatron_est.data.tokenizers)."""
    from tokenizers import AddedToken, Tokenizer

    if hasattr(tok, "processor"):
        return spm_backend(tok.processor)
    backend = Tokenizer.from_str(tok.backend.to_str())  # a copy: ours keeps encoding <|endoftext|> as text
    backend.add_special_tokens([AddedToken(tok.eod_token, special=True, normalized=False)])
    return backend


def check_same(ours, backend, texts: list[str]) -> None:
    """Refuse to write a tokenizer.json that encodes or decodes any of texts differently from ours.

    Decoding is compared only where no unknown token occurs (models without byte fallback): sentencepiece
    prints an unknown piece as " \u2047 ", a tokenizer.json as nothing.
    """
    unk = getattr(getattr(ours, "processor", None), "unk_id", lambda: -1)()
    for text in texts:
        ids = ours.encode(text)
        got = backend.encode(text, add_special_tokens=True).ids
        same_text = unk in ids or backend.decode(ids, skip_special_tokens=False) == ours.decode(ids)
        if got != ids or not same_text:
            raise ConfigError(f"tokenizer.json would not reproduce our tokenizer on {text[:40]!r} "
                              f"(ids {ids[:8]} vs {got[:8]}); export with a GPT-2 BPE or sentencepiece BPE model")


# Texts on which a conversion most easily goes wrong: whitespace runs, digits, bytes outside the vocabulary.
PROBES = ["Hello world", "  two leading spaces and  a double", "tabs\tand\nnewlines\n", "1984 and 3.14159",
          "caf\u00e9 na\u00efve \u00fcber", "\u65e5\u672c\u8a9e \U0001F600 emoji", "trailing space ", ""]


def write_hf_tokenizer(out_dir: str, ours, max_length: int) -> dict:
    """tokenizer.json and tokenizer_config.json for `ours`; returns the special-token ids for config.json."""
    backend = backend_of(ours)
    check_same(ours, backend, PROBES)
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    eod = ours.eod_token
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eod, "eos_token": eod, "pad_token": eod,
            "model_max_length": max_length, "clean_up_tokenization_spaces": False,
            "padding_side": "left"}  # batched generate() continues after the last real token of each row
    unk = getattr(getattr(ours, "processor", None), "unk_id", lambda: -1)()
    if unk >= 0:
        conf["unk_token"] = ours.processor.id_to_piece(unk)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    # No BOS in training: a document begins after the previous one's end-of-document token, so that token is
    # also the natural start for generation from nothing, and the padding token (never attended to).
    return {"bos_token_id": ours.eod, "eos_token_id": ours.eod, "pad_token_id": ours.eod}


# ------------------------------------------------------------------------------ which tokenizer a run used
def resolve_tokenizer(args: dict | None, vocab_size: int, given: dict):
    """(our tokenizer, None) for a checkpoint's saved flags `args` with the non-empty `given` flags on top, or
    (None, why not) when neither names one; a named file that is gone or does not fit the model is refused."""
    from megatron_est.data import default_corpus
    from megatron_est.data.errors import DataError
    from megatron_est.data.tokenizers import build_tokenizer

    saved = dict((args or {}).get("data") or {})
    flags = {k: v for k, v in given.items() if v}
    data = {**saved, **flags}
    kind = data.get("tokenizer_type") or "SentencePieceTokenizer"
    where = "given" if any(k in flags for k in ("tokenizer_model", "vocab_file", "merge_file")) else "saved"
    if kind == "SentencePieceTokenizer" and not data.get("tokenizer_model"):
        if not args or data.get("data_path") or vocab_size != default_corpus.VOCAB_SIZE:
            return None, ("the checkpoint names no tokenizer (weights only, or trained on pre-tokenized data "
                          "with no --tokenizer-model)")
        # The default job: the bundled corpus's model, resolved as training resolved it (relative to its cwd).
        data["tokenizer_model"] = default_corpus.tokenizer_model_path(data.get("cache_dir") or ".cache")
        where = "the default corpus's"
    for flag in ("tokenizer_model", "vocab_file", "merge_file"):
        path = data.get(flag)
        if path and not os.path.isfile(path):
            raise ConfigError(f"--{flag.replace('_', '-')}: {where} tokenizer file {path} is missing (give "
                              f"--{flag.replace('_', '-')} PATH, or --no-tokenizer)")
    try:
        tok = build_tokenizer(kind, data.get("tokenizer_model"), data.get("vocab_file"), data.get("merge_file"))
    except DataError as e:
        raise ConfigError(str(e)) from None
    if tok.vocab_size != vocab_size:
        raise ConfigError(f"--tokenizer-type {kind}: {where} tokenizer has {tok.vocab_size} tokens, the model "
                          f"{vocab_size} (not the tokenizer it trained with)")
    return tok, None
