#!/usr/bin/env python
"""Train a Llama-style sentencepiece BPE tokenizer (byte fallback, identity normaliser, split digits).

    python tools/train_tokenizer.py --input 'texts/*.txt' --model-prefix tok/my8k --vocab-size 8192
writes tok/my8k.model (use it as --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/my8k.model).
With no --input it trains on the Shakespeare corpus.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_est.data.corpus import shakespeare_files  # noqa: E402
from megatron_est.data.errors import DataError  # noqa: E402
from megatron_est.data.preprocess import expand_inputs  # noqa: E402
from megatron_est.data.tokenizers import train_sentencepiece  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="comma-separated plain-text files or globs (default: the Shakespeare corpus)")
    p.add_argument("--model-prefix", required=True, help="writes {prefix}.model and {prefix}.vocab")
    p.add_argument("--vocab-size", type=int, default=8192)
    args = p.parse_args(argv)
    try:
        files = expand_inputs(args.input) if args.input else shakespeare_files()
        start = time.perf_counter()
        path = train_sentencepiece(files, args.model_prefix, args.vocab_size)
    except DataError as e:
        print(f"train_tokenizer.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{path} ({args.vocab_size} pieces, {len(files)} files, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
