"""Plan and launch the study's training runs, one subprocess each, resumable (finished runs are skipped)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from megatron_est.arguments import parse_args
from megatron_est.est.build import build_sampler
from megatron_est.est.flops import step_flops
from megatron_est.est.savings import schedule_flops

METHODS = ("baseline", "est", "control")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Run:
    method: str
    seed: int
    argv: list[str]  # training flags

    @property
    def name(self) -> str:
        return f"{self.method}-s{self.seed}"


def control_iters(train_argv: list[str]) -> int:
    """Iterations of the full model that cost the FLOPs of the EST run (the compute-matched control)."""
    cfg = parse_args(train_argv, "study", "gpt2-tiny")
    tokens = (cfg.train.global_batch_size or cfg.train.micro_batch_size) * cfg.model.seq_length
    est = sum(s.flops for s in schedule_flops(cfg.model, build_sampler(cfg), cfg.train.train_iters, tokens))
    return max(1, round(est / step_flops(cfg.model, tokens)))


def plan_runs(train_argv: list[str], seeds: list[int], methods: list[str]) -> list[Run]:
    n_control = control_iters(train_argv) if "control" in methods else 0
    extra = {"baseline": ["--est-schedule", "none"], "est": [],
             # Its own LR schedule, ending at its own last step.
             "control": ["--est-schedule", "none", "--train-iters", str(n_control),
                         "--lr-decay-iters", str(n_control)]}
    return [Run(m, s, [*train_argv, *extra[m], "--seed", str(s)]) for s in seeds for m in methods]


def launch(run: Run, out_dir: str, script: str) -> dict:
    """Train one run unless its .done marker exists; returns the marker's content."""
    done = os.path.join(out_dir, run.name + ".done")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    metrics = os.path.join(out_dir, run.name + ".jsonl")
    cmd = [sys.executable, os.path.join(ROOT, script), *run.argv, "--metrics-file", metrics]
    print(f"[study] {run.name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    with open(os.path.join(out_dir, run.name + ".log"), "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"run {run.name} failed (exit {rc}); see {out_dir}/{run.name}.log")
    info = {"name": run.name, "method": run.method, "seed": run.seed, "wall_s": time.time() - t0, "argv": run.argv}
    tmp = done + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, done)
    return info
