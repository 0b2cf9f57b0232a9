"""Shared test helpers: tiny configs, deterministic inputs, and a gloo multi-process launcher."""
from __future__ import annotations

import os
import socket
import tempfile
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_est.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(family: str, **kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=250,
                make_vocab_size_divisible_by=64, seq_length=32)
    if family == "llama":
        base.update(num_query_groups=2, ffn_hidden_size=96)
    return ModelConfig(family=family, **{**base, **kw})


def token_batch(cfg: ModelConfig, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        # No barrier: the peers may be waiting in a collective this rank will never join. Closing our connections
        # makes theirs fail, so a bug in one rank fails the test at once instead of hanging it.
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, *args) -> list:
    """Run fn(rank, world, *args) in `world` spawned gloo processes; return each rank's return value."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(world, free_port(), fn, args, out), nprocs=world, start_method="spawn")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def tiny_cli_argv(tmp_path, iters: int, eval_interval: int) -> list[str]:
    """Entry-point flags for a 2-layer GPT-2 on a small random indexed dataset written once under tmp_path
    (GPT-2's shipped tokenizer files), one thread, a log line every iteration."""
    import numpy as np

    from megatron_est.data.indexed_dataset import write_indexed_dataset
    from megatron_est.data.tokenizers import gpt2_files

    prefix = os.path.join(str(tmp_path), "toks_text_document")
    if not os.path.exists(prefix + ".bin"):
        rng = np.random.default_rng(0)
        write_indexed_dataset(prefix, [rng.integers(0, 200, size=60 + 5 * i) for i in range(40)], np.uint16)
    vocab, merges = gpt2_files()
    return ["--data-path", prefix, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
            "--merge-file", merges, "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
            "--log-interval", "1", "--eval-interval", str(eval_interval), "--eval-iters", "1", "--lr", "1e-3",
            "--data-cache-dir", os.path.join(str(tmp_path), "cache"), "--num-threads", "1"]
