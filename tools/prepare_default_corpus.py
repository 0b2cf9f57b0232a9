#!/usr/bin/env python
"""Build the bundled corpus (Shakespeare, Wikipedia excerpt) with a SentencePiece vocabulary of any size, and
print the dataset prefixes and tokenizer model to pass to training:

    python tools/prepare_default_corpus.py --vocab-size 1024
    # -> .cache/default_corpus/v2-spm1024/{shakespeare,wikipedia}_text_document, .../shakespeare_spm1024.model

The default job builds the same corpus with 8192 tokens on first use. Built once; reruns only print.

    python tools/prepare_default_corpus.py --corpus long --vocab-size 1024
    # -> .cache/long_corpus/long-v1-spm1024/{long,wikipedia}_text_document, .../long_spm1024.model

--corpus long: the opt-in corpus for long runs (megatron_est/data/long_corpus.py: Shakespeare, the U.S.
presidential annual messages and the King James Bible, 21.6 MB; Wikipedia stays held out). It prints the
token count and how many epochs a run of --train-iters x --tokens-per-iteration sees.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_est.data.default_corpus import prepare_default_corpus  # noqa: E402
from megatron_est.data.errors import DataError  # noqa: E402
from megatron_est.data.indexed_dataset import IndexedDataset  # noqa: E402
from megatron_est.data.long_corpus import prepare_long_corpus  # noqa: E402


def _long(args: argparse.Namespace) -> tuple[list, str]:
    corpus = prepare_long_corpus(args.data_cache_dir, args.vocab_size)
    tokens = IndexedDataset(corpus.train).num_tokens
    print(f"dataset prefix: {corpus.train}  ({tokens} tokens)")
    if corpus.wikipedia:
        print(f"held-out prefix: {corpus.wikipedia}")
    if args.train_iters:
        seen = args.train_iters * args.tokens_per_iteration
        print(f"{args.train_iters} iterations x {args.tokens_per_iteration} tokens = {seen} tokens: "
              f"{seen / tokens:.2f} passes over the corpus")
    return [corpus.train], corpus.tokenizer_model


def main(argv: list[str] | None = None) -> tuple[list, str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=["default", "long"], default="default")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--data-cache-dir", default=".cache")
    ap.add_argument("--train-iters", type=int, help="--corpus long: print the passes a run this long makes")
    ap.add_argument("--tokens-per-iteration", type=int, default=32 * 128, help="global batch x sequence length")
    args = ap.parse_args(argv)
    if args.vocab_size < 64:
        ap.error(f"--vocab-size must be at least 64, got {args.vocab_size}")
    try:
        if args.corpus == "long":
            data_path, model = _long(args)
        else:
            data_path, model = prepare_default_corpus(args.data_cache_dir, args.vocab_size)
            for item in data_path:
                if isinstance(item, str):
                    print(f"dataset prefix: {item}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"tokenizer model: {model}")
    return data_path, model


if __name__ == "__main__":
    main()
