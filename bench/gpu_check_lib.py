"""Helpers shared by the GPU check's child processes: the check context, its own corpus, training runs.

Every check runs in a child process of bench/gpu_check.py; a check function takes a Ctx and returns
(status, detail) with status "pass", "fail", "skip" or "info". Training runs go through the real entry points
(pretrain_gpt.py / pretrain_llama.py) as further subprocesses, and their losses come from --metrics-file.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = {"gpt2": "pretrain_gpt.py", "llama": "pretrain_llama.py"}
PRESET = {"gpt2": "gpt2-tiny", "llama": "llama-tiny"}
# All three EST stages in a few iterations: stage 1 (heads, neurons, layers sampled), stage 2 (all layers),
# stage 3 (full model).
SCHEDULE = "0:0.5,0.5,0.5;{s2}:0.5,0.5,1;{s3}:1,1,1"


class CheckError(Exception):
    """A check's precondition or a run failed; the message becomes the table's detail."""


@dataclass
class Ctx:
    work: str  # this check session's scratch folder (shared by all checks: cached baselines live here)
    smoke: bool  # --cpu-smoke: CPU, minimal sizes; GPU-only checks skip
    deadline: float  # time.monotonic() by which this check must be done

    @property
    def gpu(self) -> bool:
        return not self.smoke

    def iters(self) -> int:
        return 6 if self.smoke else 9

    def size_flags(self) -> list[str]:
        """Tiny-run sizes: 2 micro-batches per step (gradient accumulation is exercised)."""
        if self.smoke:
            return ["--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4"]
        return ["--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "8"]


def time_left(ctx: Ctx) -> float:
    import time

    return ctx.deadline - time.monotonic()


def child_env(ctx: Ctx, cpu: bool = False) -> dict:
    """Environment of a training subprocess; cpu=True hides the GPUs (the CPU reference run)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cpu or ctx.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    # few threads in the smoke run (shared cores); the CPU reference on a GPU machine may use more of its cores
    env["OMP_NUM_THREADS"] = "1" if ctx.smoke else "8" if cpu else env.get("OMP_NUM_THREADS", "4")
    return env


def run_cmd(ctx: Ctx, cmd: list[str], env: Optional[dict] = None, log_name: str = "run") -> str:
    """Run a command inside the check's time; raise CheckError with its last stderr lines on failure."""
    timeout = max(5.0, time_left(ctx))
    log = os.path.join(ctx.work, f"{log_name}.log")
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env or child_env(ctx), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise CheckError(f"{log_name}: timed out after {timeout:.0f}s") from e
    with open(log, "w") as f:
        f.write(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        raise CheckError(f"{log_name}: exit {p.returncode}: " + tail(p.stderr or p.stdout))
    return p.stdout


def tail(text: str, n: int = 1) -> str:
    """The lines that say what went wrong: the last error line (not a launcher's summary) and the last lines."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^([\w.]*(Error|Exception)\b|error:)", ln)
              and "ChildFailedError" not in ln]  # torchrun's summary hides the rank's own error
    picked = ([errors[-1]] if errors else []) + [ln for ln in lines[-n:] if not errors or ln != errors[-1]]
    return " / ".join(picked)[-500:]


def corpus(ctx: Ctx) -> list[str]:
    """--data-path/--tokenizer flags of the check's own corpus, built once per work folder.

    The repository's own docs and sources: no data package is needed (a GPU machine may have none), and the
    CPU reference run and the GPU runs read the very same tokens."""
    from megatron_est.data.indexed_dataset import smallest_token_dtype, write_indexed_dataset
    from megatron_est.data.tokenizers import SentencePieceTokenizer, train_sentencepiece

    root = os.path.join(ctx.work, "corpus")
    model, prefix = os.path.join(root, "spm.model"), os.path.join(root, "repo_text_document")
    if not os.path.isfile(prefix + ".idx"):
        os.makedirs(root, exist_ok=True)
        files = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")) + [os.path.join(ROOT, "README.md")]
                       + glob.glob(os.path.join(ROOT, "megatron_est", "**", "*.py"), recursive=True))
        files = [f for f in files if os.path.getsize(f) > 0]  # empty __init__.py files are refused
        train_sentencepiece(files, model[: -len(".model")], vocab_size=2048)
        tok = SentencePieceTokenizer(model)
        # written directly, not through tools/preprocess_data.py: that needs `datasets`, absent on GPU images
        docs = [tok.encode(open(f, encoding="utf-8").read()) + [tok.eod] for f in files]
        write_indexed_dataset(prefix, docs, smallest_token_dtype(tok.vocab_size))
    return ["--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", model, "--split", "95,5,0", "--data-cache-dir", os.path.join(ctx.work, "cache")]


def supports_flag(ctx: Ctx, flag: str) -> bool:
    """Whether the entry point knows a flag (its --help, read once per session: each read imports torch)."""
    path = os.path.join(ctx.work, "pretrain_help.txt")
    if not os.path.isfile(path):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--help"], cwd=ROOT,
                           capture_output=True, text=True, env=child_env(ctx, cpu=True))
        with open(path, "w") as f:
            f.write(p.stdout)
    return flag in open(path).read()


def kernels_line(ctx: Ctx, name: str) -> str:
    """The run's "> kernels:" header (TF32, apex or torch norms, optimizer), from its log."""
    path = os.path.join(ctx.work, f"{name}.log")
    lines = [ln for ln in open(path).read().splitlines() if ln.startswith("> kernels:")] if os.path.isfile(path) else []
    return lines[0][len("> kernels: "):] if lines else "no kernels line"


def train(ctx: Ctx, family: str, name: str, extra: list[str], cpu: bool = False, nproc: int = 0,
          cached: bool = True) -> list[dict]:
    """Train the family's tiny preset through its entry point; the metrics-file records of the run.

    nproc 0: a plain process; nproc >= 1: torchrun with that many processes. Results are cached by name in
    the work folder, so a baseline is trained once per session."""
    metrics = os.path.join(ctx.work, f"{name}.jsonl")
    if cached and os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        return read_metrics(metrics)
    n = ctx.iters()
    sched = SCHEDULE.format(s2=n // 3, s3=2 * n // 3)
    args = ["--model-preset", PRESET[family], *ctx.size_flags(), "--train-iters", str(n), "--log-interval", "1",
            "--eval-iters", "1", "--eval-interval", "1000", "--lr", "1e-3", "--min-lr", "1e-4",
            "--lr-warmup-iters", "1", "--est-schedule", sched, "--seed", "1234", "--metrics-file", metrics,
            *corpus(ctx), *extra]
    launcher = [sys.executable]
    if nproc >= 1:
        from bench.common import free_port

        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                     "--master-port", str(free_port())]
    if os.path.exists(metrics):
        os.remove(metrics)
    run_cmd(ctx, launcher + [os.path.join(ROOT, ENTRY[family]), *args], child_env(ctx, cpu), log_name=name)
    return read_metrics(metrics)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(records: list[dict]) -> list[float]:
    return [r["lm_loss"] for r in records if "lm_loss" in r]


def check_curve(recs: list[dict], what: str) -> list[float]:
    """The run's losses; CheckError unless they are finite, fall, and the run went through all 3 stages."""
    ls = losses(recs)
    if not ls:
        raise CheckError(f"{what}: no losses in the metrics file")
    if not all(math.isfinite(x) for x in ls):
        raise CheckError(f"{what}: non-finite loss {ls}")
    if not min(ls[-2:]) < ls[0] - 0.05:  # falling: the last steps clearly below the first
        raise CheckError(f"{what}: loss not falling {fmt(ls)}")
    stages = sorted({r["est_stage"] for r in recs if "est_stage" in r})
    if stages != [1, 2, 3]:
        raise CheckError(f"{what}: EST stages seen {stages}, expected [1, 2, 3]")
    return ls


def max_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        raise CheckError(f"loss curves of different lengths {len(a)} and {len(b)}")
    return max(abs(x - y) for x, y in zip(a, b))


def fmt(ls: list[float]) -> str:
    return "[" + ", ".join(f"{x:.4f}" for x in ls) + "]"
