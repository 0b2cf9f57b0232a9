"""The GPU check's results: printed row by row and rewritten as a markdown file after every check.

The file is written to a temporary name and renamed, so a run killed at any moment leaves a complete table of
the checks finished so far, ready to paste into docs/gpu.md.
"""
from __future__ import annotations

import datetime
import glob
import os
import platform
import shlex
import sys

STATUS = {"pass": "PASS", "fail": "FAIL", "skip": "skip", "info": "info"}


class Report:
    def __init__(self, path: str, smoke: bool, budget_s: float, argv: list[str]):
        self.path, self.rows, self.failed = path, [], False
        mode = "CPU smoke (--cpu-smoke): minimal sizes on CPU, not GPU results" if smoke else "GPU"
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.head = [f"# GPU check results ({mode})", "",
                     f"    {os.environ.get('GPU_CHECK_COMMAND') or ' '.join(shlex.quote(a) for a in argv)}", "",
                     f"Started {started} on {platform.node()}, Python {platform.python_version()} "
                     f"({sys.executable}), time budget {budget_s:.0f}s.", "",
                     "| # | check | status | s | what | result |", "|---|---|---|---|---|---|"]
        self.foot: list[str] = ["", "(run in progress or killed: rows above are the checks finished)"]
        self._write()
        print("\n".join(self.head), flush=True)

    def add(self, check, status: str, detail: str, seconds: float) -> None:
        self.failed |= status == "fail"
        detail = " ".join(detail.split()).replace("|", "/")  # one table cell
        row = f"| {len(self.rows) + 1} | {check.name} | {STATUS.get(status, status)} | {seconds:.0f} | " \
              f"{check.what} | {detail} |"
        self.rows.append(row)
        print(row, flush=True)
        self._write()

    def finish(self, seconds: float, work: str) -> None:
        n = {s: sum(f"| {STATUS[s]} |" in r for r in self.rows) for s in STATUS}
        self.foot = ["", f"Done in {seconds:.0f}s: {n['pass']} pass, {n['fail']} fail, {n['skip']} skipped, "
                         f"{n['info']} info. Logs: {work}"]
        self._write()
        print("\n".join(self.foot), flush=True)
        if self.failed:
            self._failure_logs(work)

    def _failure_logs(self, work: str) -> None:
        """The tails of every run log beside the table (one file: few files travel back from a GPU machine)."""
        out = os.path.splitext(self.path)[0] + "_logs.txt"
        with open(out, "w") as f:
            for log in sorted(glob.glob(os.path.join(work, "*.log"))):
                lines = open(log, errors="replace").read().splitlines()
                f.write(f"===== {os.path.basename(log)} (last 40 lines)\n" + "\n".join(lines[-40:]) + "\n")
        print(f"failure logs: {out}", flush=True)

    def _write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(self.head + self.rows + self.foot) + "\n")
        os.replace(tmp, self.path)
