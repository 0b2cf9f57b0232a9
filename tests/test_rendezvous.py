"""Rendezvous through the real entry point: a rank whose peers never come up says it is waiting, for how many and
where, and the job fails in one line at --distributed-timeout-minutes instead of waiting silently. (Ranks that do
meet: every multi-process launch in tests/test_launch.py goes through the same rendezvous.)"""
import os
import subprocess
import sys

from tests.helpers import ROOT, free_port

# 0.05 minutes: the first notice comes after half of it, the failure at the deadline.
_CODE = ("import sys; sys.path.insert(0, %r)\nfrom megatron_est.training.pretrain import main\n"
         "main(['--distributed-timeout-minutes', '0.05', '--train-iters', '20'])\n" % ROOT)


def _rank(rank: int, world: int, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, env=env, timeout=120)


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_rank0_alone_reports_the_wait_and_fails_in_one_line():
    port = free_port()
    out = _rank(0, 3, port)
    assert out.returncode != 0
    assert f"rank 0: waiting for 2 ranks at 127.0.0.1:{port}" in out.stderr
    assert _last_line(out.stderr) == (f"error: rendezvous at 127.0.0.1:{port} incomplete after "
                                      "--distributed-timeout-minutes 0.05: 1 of 3 ranks arrived (missing ranks 1, 2)")
    assert "Traceback" not in out.stderr


def test_a_rank_without_rank0_fails_in_one_line():
    port = free_port()
    out = _rank(1, 2, port)
    assert out.returncode != 0
    assert f"rank 1: waiting for rank 0 at 127.0.0.1:{port}" in out.stderr
    assert _last_line(out.stderr).startswith(f"error: rank 1: no rendezvous at 127.0.0.1:{port} within "
                                             "--distributed-timeout-minutes 0.05")
    assert "Traceback" not in out.stderr
