#!/usr/bin/env python
"""Build the bundled corpus (Shakespeare, Wikipedia excerpt) with a SentencePiece vocabulary of any size, and
print the dataset prefixes and tokenizer model to pass to training:

    python tools/prepare_default_corpus.py --vocab-size 1024
    # -> .cache/default_corpus/v2-spm1024/{shakespeare,wikipedia}_text_document, .../shakespeare_spm1024.model

The default job builds the same corpus with 8192 tokens on first use. Built once; reruns only print.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_est.data.default_corpus import prepare_default_corpus  # noqa: E402
from megatron_est.data.errors import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> tuple[list, str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--data-cache-dir", default=".cache")
    args = ap.parse_args(argv)
    if args.vocab_size < 64:
        ap.error(f"--vocab-size must be at least 64, got {args.vocab_size}")
    try:
        data_path, model = prepare_default_corpus(args.data_cache_dir, args.vocab_size)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for item in data_path:
        if isinstance(item, str):
            print(f"dataset prefix: {item}")
    print(f"tokenizer model: {model}")
    return data_path, model


if __name__ == "__main__":
    main()
