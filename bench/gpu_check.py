#!/usr/bin/env python
"""GPU cluster correctness check: every check in its own subprocess and time limit, results as a markdown table.

    bash scripts/gpu_check.sh                      # on a GPU machine (docs/gpu.md)
    python bench/gpu_check.py --cpu-smoke          # the same checks on CPU at minimal sizes
    python bench/gpu_check.py --only env,gpt2_fp32_vs_cpu --out /tmp/t.md

A failing check is recorded with the last lines of its error and the run moves on; when the time budget is
spent the remaining checks are listed as skipped. The table file is rewritten after every check, so a killed
run still leaves its finished rows. Exit status: 0 when no check failed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.gpu_check_checks import CHECKS, run_child  # noqa: E402
from bench.gpu_check_report import Report  # noqa: E402

RESULT_TAG = "GPU_CHECK_RESULT "


def _default_out() -> str:
    if os.environ.get("GPU_CHECK_OUT"):
        return os.environ["GPU_CHECK_OUT"]
    return os.path.join(os.environ.get("OUT") or "/tmp", "gpu_check.md")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", default=os.environ.get("GPU_CHECK_FORCE_CPU") == "1",
                    help="run on CPU at minimal sizes; GPU-only checks skip (also GPU_CHECK_FORCE_CPU=1)")
    ap.add_argument("--out", default=_default_out(), help="markdown results ($GPU_CHECK_OUT, $OUT/gpu_check.md, "
                                                          "else /tmp/gpu_check.md)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="total time budget; checks that would start after it are skipped "
                         "($GPU_CHECK_BUDGET_S, default 480, 1200 with --cpu-smoke: shared CPUs are slow)")
    ap.add_argument("--work-root", default=os.environ.get("GPU_CHECK_WORK_ROOT", "/tmp"),
                    help="a fresh scratch folder gpu_check_* (corpus, runs, logs) is made under it")
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)  # internal: the child's scratch folder
    ap.add_argument("--only", default="", help="comma-separated check names (see --list)")
    ap.add_argument("--list", action="store_true", help="list the checks and exit")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one check in this process
    ap.add_argument("--deadline-s", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = float(os.environ.get("GPU_CHECK_BUDGET_S", 1200 if args.cpu_smoke else 480))
    return args


def run_check(args, name: str, timeout: float) -> tuple[str, str]:
    """One check in a child process group (killed whole on timeout); (status, detail)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--work", args.work,
           "--deadline-s", str(timeout - 3)] + (["--cpu-smoke"] if args.cpu_smoke else [])
    log_path = os.path.join(args.work, f"check_{name}.log")
    with open(log_path, "w") as log:
        # few threads per process: oversubscribed cores (other jobs, torchrun ranks) slow tiny runs manyfold
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1" if args.cpu_smoke else "4"))
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True, env=env)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the check's own training subprocesses too
            p.communicate()
            return "fail", f"timed out after {timeout:.0f}s (killed)"
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_TAG):
            r = json.loads(line[len(RESULT_TAG):])
            return r["status"], r["detail"]
    from bench.gpu_check_lib import tail

    return "fail", f"exit {p.returncode}, no result: " + tail(open(log_path).read() or out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        status, detail = run_child(args.child, args.work, args.cpu_smoke, args.deadline_s)
        print(RESULT_TAG + json.dumps({"status": status, "detail": detail}), flush=True)
        return 0
    names = [c.name for c in CHECKS]
    if args.list:
        for c in CHECKS:
            print(f"{c.name:20s} {c.what}")
        return 0
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"error: unknown check(s) {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    os.makedirs(args.work_root, exist_ok=True)
    # fresh every session: cached baselines of an earlier session (other code) must not be reused
    args.work = tempfile.mkdtemp(prefix="gpu_check_", dir=args.work_root)
    report = Report(args.out, args.cpu_smoke, args.budget_s, sys.argv)
    start = time.monotonic()
    for c in (c for c in CHECKS if c.name in chosen):
        left = args.budget_s - (time.monotonic() - start)
        if left < 15:
            report.add(c, "skip", f"time budget of {args.budget_s:.0f}s spent", 0.0)
            continue
        t0 = time.monotonic()
        status, detail = run_check(args, c.name, min(c.timeout(args.cpu_smoke), left))
        report.add(c, status, detail, time.monotonic() - t0)
    report.finish(time.monotonic() - start, args.work)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
