"""Plan and launch the study's training runs, one subprocess each, resumable: finished runs are skipped, and an
interrupted run resumes from its last checkpoint (every CHECKPOINT_FRACTION of its iterations, under
OUT/.cache/ckpt/<run>/, which .gitignore's `.cache/` keeps out of git, or another root; its metrics file is
kept beside it until the run finishes and lands in OUT/<run>.jsonl; both are deleted then).

Methods: "baseline" (full model), "est" and "est-<variant>" (EST with extra flags), and "control-i<N>": the full
model for N iterations, N chosen so that it costs the FLOPs an EST run actually logged, with its own LR schedule
ending at its own last step. EST variants of equal FLOPs share one control.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from megatron_est.training.checkpoint_layout import read_latest_iteration

METHODS = ("baseline", "est", "control")
CHECKPOINT_FRACTION = 0.05  # of a run's iterations between checkpoints: a kill loses at most this much
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Run:
    method: str
    seed: int
    argv: list[str]  # training flags

    @property
    def name(self) -> str:
        return f"{self.method}-s{self.seed}"


EST_ONLY_FLAGS = ("--est-target-saving",)  # flags (with a value) that a full-model run refuses


def full_model(train_argv: list[str]) -> list[str]:
    """The study's training flags for a full-model run: without the EST-only flags (--est-target-saving fits an
    EST schedule, and the trainer refuses it with --est-schedule none), then --est-schedule none."""
    out, skip = [], False
    for a in train_argv:
        if skip:
            skip = False
        elif a in EST_ONLY_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in EST_ONLY_FLAGS)):
            out.append(a)
    return [*out, "--est-schedule", "none"]


def baseline_run(train_argv: list[str], seed: int) -> Run:
    return Run("baseline", seed, [*full_model(train_argv), "--seed", str(seed)])


def est_run(train_argv: list[str], seed: int, variant: str = "", flags: tuple[str, ...] = ()) -> Run:
    return Run(f"est-{variant}" if variant else "est", seed, [*train_argv, *flags, "--seed", str(seed)])


def control_run(train_argv: list[str], seed: int, iters: int) -> Run:
    return Run(f"control-i{iters}", seed, [*full_model(train_argv), "--train-iters", str(iters),
                                            "--lr-decay-iters", str(iters), "--seed", str(seed)])


def control_iters(metrics_file: str) -> int:
    """Full-model iterations costing the cumulative training FLOPs that a finished run logged."""
    with open(metrics_file) as f:
        last = [json.loads(line) for line in f if '"lm_loss"' in line][-1]
    return max(1, round(last["cumulative_flops"] / last["full_step_flops"]))


def checkpoint_dir(out_dir: str, run: Run, root: Optional[str] = None) -> str:
    """root: where the study keeps checkpoints (default OUT/.cache/ckpt, which .gitignore's `.cache/` covers)."""
    return os.path.join(root or os.path.join(out_dir, ".cache", "ckpt"), run.name)


def live_metrics(ckpt: str) -> str:
    """An unfinished run's metrics file: beside its checkpoint, so the two are kept or lost together (a work
    tree laid anew between sessions keeps neither); copied to OUT/<run>.jsonl when the run finishes."""
    return ckpt + ".jsonl"


def _flag(run: Run, name: str) -> Optional[int]:
    """An integer flag's value in the run's argv (the last one given wins, as in argparse); None if absent."""
    values = [run.argv[i + 1] for i, a in enumerate(run.argv[:-1]) if a == name]
    return int(values[-1]) if values else None


def train_iters(run: Run) -> Optional[int]:
    return _flag(run, "--train-iters")  # None: the preset's


def checkpoint_flags(run: Run, ckpt: str) -> list[str]:
    """--save/--load to one folder (a fresh start while it holds no checkpoint), saved about every
    CHECKPOINT_FRACTION of the run's iterations, at a multiple of --log-interval: a run resumed there logs the
    same train-loss averages as an uninterrupted one (each averages the iterations since the previous line)."""
    flags = ["--save", ckpt, "--load", ckpt, "--keep-last", "2"]  # 2: a damaged newest one has a fallback
    iters, log = train_iters(run), _flag(run, "--log-interval") or 1
    if iters:
        flags += ["--save-interval", str(log * max(1, round(iters * CHECKPOINT_FRACTION / log)))]
    return flags


def last_train_iteration(metrics_file: str) -> int:
    if not os.path.exists(metrics_file):
        return 0
    with open(metrics_file) as f:
        return max((json.loads(line)["iteration"] for line in f if '"lm_loss"' in line), default=0)


def drop_unusable_checkpoint(ckpt: str, metrics: str) -> None:
    """A checkpoint whose run's metrics do not reach it (the metrics file lost or older than the checkpoint)
    would resume into a metrics file with a gap: remove it, so the run starts over."""
    at = read_latest_iteration(ckpt) if os.path.isdir(ckpt) else None
    if at is not None and last_train_iteration(metrics) < at:
        print(f"[study] {ckpt}: checkpoint at iteration {at} but {metrics} ends at "
              f"{last_train_iteration(metrics)}: starting the run over", flush=True)
        shutil.rmtree(ckpt)


def launch(run: Run, out_dir: str, script: str, ckpt_root: Optional[str] = None, keep: bool = False) -> dict:
    """Train one run unless its .done marker exists; returns the marker's content. An interrupted run resumes
    from its checkpoint; the trainer then drops the metrics it logged after that checkpoint. keep: leave the
    finished run's checkpoints in place (for tools/evaluate.py), instead of deleting them."""
    done = os.path.join(out_dir, run.name + ".done")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    ckpt = checkpoint_dir(out_dir, run, ckpt_root)
    metrics = live_metrics(ckpt)
    drop_unusable_checkpoint(ckpt, metrics)
    t0 = time.time()
    _train(run, out_dir, script, ckpt, metrics)
    stopped = last_train_iteration(metrics)
    if train_iters(run) and stopped < train_iters(run):  # a clean early exit (signal, --exit-interval)
        raise RuntimeError(f"run {run.name} stopped at iteration {stopped} of {train_iters(run)}; "
                           f"run the study again to resume it")
    info = {"name": run.name, "method": run.method, "seed": run.seed, "wall_s": time.time() - t0, "argv": run.argv}
    _publish(metrics, os.path.join(out_dir, run.name + ".jsonl"))
    _publish_json(info, done)
    if not keep:
        shutil.rmtree(ckpt, ignore_errors=True)  # after the marker: a kill in between leaves a finished run
    os.remove(metrics)
    print(f"[study] done {run.name} in {info['wall_s']:.0f} s (the last launch)", flush=True)
    return info


def _train(run: Run, out_dir: str, script: str, ckpt: str, metrics: str) -> None:
    os.makedirs(os.path.dirname(ckpt), exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, script), *run.argv, "--metrics-file", metrics,
           *checkpoint_flags(run, ckpt)]
    print(f"[study] start {run.name}: {' '.join(cmd[1:])}", flush=True)
    with open(os.path.join(out_dir, run.name + ".log"), "a") as log:  # "a": a resumed run keeps its earlier log
        log.write(f"[study] {time.strftime('%Y-%m-%d %H:%M:%S')} start {' '.join(cmd[1:])}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        raise RuntimeError(f"run {run.name} failed (exit {rc}); see {out_dir}/{run.name}.log")


def _publish(src: str, dst: str) -> None:
    """Copy through a temporary file in dst's folder and os.replace (src may be on another file system)."""
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _publish_json(obj: dict, dst: str) -> None:
    tmp = dst + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, dst)


@dataclass
class Study:
    """Runs baselines and EST->control chains on `jobs` concurrent workers; remembers what ran."""
    out_dir: str
    script: str
    train_argv: list[str]
    with_control: bool = True
    report_only: bool = False  # train nothing: take the finished runs, skip the others
    checkpoint_root: Optional[str] = None  # see checkpoint_dir
    keep_checkpoints: bool = False  # finished runs keep their checkpoints (downstream evaluation later)
    finished: list[Run] = field(default_factory=list)
    matched: dict[str, str] = field(default_factory=dict)  # EST method -> its control method
    errors: list[str] = field(default_factory=list)
    _locks: dict = field(default_factory=lambda: defaultdict(threading.Lock))
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def _launch(self, run: Run) -> bool:
        with self._guard:
            lock = self._locks[run.name]
        if self.report_only and not os.path.exists(os.path.join(self.out_dir, run.name + ".done")):
            return False
        try:
            with lock:  # two EST variants of equal FLOPs wait for one shared control
                launch(run, self.out_dir, self.script, self.checkpoint_root, self.keep_checkpoints)
        except RuntimeError as e:
            self.errors.append(str(e))
            print(f"[study] {e}", flush=True)
            return False
        with self._guard:
            if all(r.name != run.name for r in self.finished):
                self.finished.append(run)
        return True

    def est_chain(self, seed: int, variant: str = "", flags: tuple[str, ...] = ()) -> None:
        run = est_run(self.train_argv, seed, variant, flags)
        if not self._launch(run) or not self.with_control:
            return
        control = control_run(self.train_argv, seed, control_iters(os.path.join(self.out_dir, run.name + ".jsonl")))
        self.matched[run.method] = control.method
        self._launch(control)

    def run_all(self, tasks: list[tuple], jobs: int) -> None:
        """tasks: ("baseline", seed) or ("est", seed, variant, flags), started in this order."""
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(self._launch, baseline_run(self.train_argv, t[1])) if t[0] == "baseline"
                       else pool.submit(self.est_chain, *t[1:]) for t in tasks]
            for f in futures:
                f.result()
