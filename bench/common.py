"""Shared benchmark helpers: interleaved timing so that machine noise hits every variant alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_times(variants: dict[str, Callable[[], None]], reps: int, warmup: int = 1) -> dict[str, list]:
    """Run each variant once per round, `reps` rounds (after `warmup` rounds); wall seconds per call."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list] = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def in_fresh_processes(script: str, argv: list[str], n: int) -> list:
    """Run `python script --json-out FILE *argv` in n fresh processes, one after another, and return what each
    wrote: where a process's tensors land moves its ratios (docs/benchmarks.md), so one process is one sample."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            out = os.path.join(tmp, f"{i}.json")
            print(f"# process {i + 1}/{n}", flush=True)
            subprocess.run([sys.executable, os.path.abspath(script), "--json-out", out, *argv], check=True)
            with open(out) as f:
                runs.append(json.load(f))
    return runs


def spread(xs: list, fmt: str = ".3f") -> str:
    """median (min..max)"""
    return f"{median(xs):{fmt}} ({min(xs):{fmt}}..{max(xs):{fmt}})"


def median(xs: list) -> float:
    return statistics.median(xs)


def model_bench_setup(doc: str):
    """Parse the flags shared by the model benchmarks; returns (args, model config, tokens [mbs, seq+1])."""
    import argparse

    import torch

    from megatron_est.config import model_preset

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = model_preset(args.preset, seq_length=args.seq_length)
    tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch_size, cfg.seq_length + 1),
                           generator=torch.Generator().manual_seed(0))
    return args, cfg, tokens


def free_port() -> int:
    """A free TCP port on the loopback interface, for a benchmark's own process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
