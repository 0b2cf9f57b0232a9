"""scripts/gpu_check.sh and its driver (bench/gpu_check.py): the no-GPU exit, the budget, timeouts, the table,
and (slow) the whole check list on CPU at minimal sizes, so the first GPU run fails only for GPU reasons."""
from __future__ import annotations

import os
import subprocess
import time
import types

import pytest
import torch

from bench import gpu_check
from bench.gpu_check_checks import CHECKS
from bench.gpu_check_lib import CheckError, check_curve, tail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_ONLY = {"flash_sdpa", "zero2_fp16", "host_syncs", "tp2_pp2"}  # skipped by --cpu-smoke, with a reason
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run for real")


def _env(tmp_path, **kw) -> dict:
    env = dict(os.environ, GPU_CHECK_WORK_ROOT=str(tmp_path / "work"), GPU_CHECK_OUT=str(tmp_path / "out.md"))
    env.pop("PYTHON", None)
    env.pop("GPU_CHECK_FORCE_CPU", None)
    env.update(kw)
    return env


def _rows(path) -> dict:
    """check name -> (status, result) of a results table."""
    rows = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].isdigit():
            rows[cells[1]] = (cells[2], cells[5])
    return rows


@no_gpu
def test_script_without_gpu_says_so_and_runs_nothing(tmp_path):
    t0 = time.monotonic()
    p = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "no GPU present" in p.stdout
    assert not (tmp_path / "work").exists() and not (tmp_path / "out.md").exists()  # nothing ran
    assert time.monotonic() - t0 < 60


def test_spent_budget_skips_every_check_and_still_writes_the_table(tmp_path):
    out = tmp_path / "t.md"
    rc = gpu_check.main(["--cpu-smoke", "--budget-s", "0", "--out", str(out), "--work-root", str(tmp_path)])
    assert rc == 0
    rows = _rows(out)
    assert list(rows) == [c.name for c in CHECKS]
    assert all(s == "skip" and "budget" in r for s, r in rows.values())
    assert "Done in" in out.read_text()


def test_a_check_past_its_time_is_killed_and_recorded_as_failed(tmp_path):
    args = types.SimpleNamespace(work=str(tmp_path), cpu_smoke=True)
    t0 = time.monotonic()
    status, detail = gpu_check.run_check(args, "gpt2_fp32_vs_cpu", timeout=4.0)  # needs far more than 4 s
    assert status == "fail" and "timed out" in detail
    assert time.monotonic() - t0 < 30


def test_unknown_check_is_refused(tmp_path):
    assert gpu_check.main(["--only", "nope", "--out", str(tmp_path / "x.md"), "--work-root", str(tmp_path)]) == 2


def test_failure_detail_is_the_ranks_error_not_the_launchers_summary():
    log = "Traceback ...\nAssertionError: backend not initialized\nE1201 failed\n" \
          "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n=====\n"
    assert tail(log).startswith("AssertionError: backend not initialized")


def _recs(ls, stages=(1, 2, 3)):
    return [{"lm_loss": x, "est_stage": stages[min(i, len(stages) - 1)]} for i, x in enumerate(ls)]


def test_loss_curve_check_rejects_flat_nonfinite_and_missing_stages():
    assert check_curve(_recs([7.0, 6.5, 6.0]), "ok") == [7.0, 6.5, 6.0]
    for bad in (_recs([7.0, 7.0, 7.0]), _recs([7.0, float("nan"), 6.0]), _recs([7.0, 6.5, 6.0], (1, 1, 1))):
        with pytest.raises(CheckError):
            check_curve(bad, "bad")


@no_gpu
@pytest.mark.slow
def test_cpu_smoke_runs_every_check_and_passes_the_non_gpu_ones(tmp_path):
    out = tmp_path / "smoke.md"
    p = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-smoke", "--out", str(out), "--budget-s", "1200"],
                       cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=1500)
    rows = _rows(out)
    assert list(rows) == [c.name for c in CHECKS], p.stdout[-3000:]
    for name, (status, result) in rows.items():
        if name in GPU_ONLY:
            assert status == "skip" and ("CUDA" in result or "CPU smoke" in result), (name, result)
        else:
            assert status in ("PASS", "info"), (name, status, result)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "CPU smoke" in out.read_text().splitlines()[0]
