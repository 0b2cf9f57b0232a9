"""CPU ranks keep freed host memory (megatron_est/host_memory.py): a repeated step stops page-faulting.

Each case runs in a fresh interpreter, because mallopt changes the whole process and glibc's dynamic thresholds
depend on what the process allocated before. The negative control is glibc's default in the same script.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_est.host_memory import _glibc, keep_freed_memory, preloaded_allocator

pytestmark = pytest.mark.skipif(_glibc() is None or preloaded_allocator() is not None,
                                reason="needs glibc's malloc (the platform of the CPU machines and clusters)")

# What a training step does to the allocator, small: allocate activation-sized blocks, use them, free them, again.
_SCRIPT = """
import json, resource, sys, torch
from megatron_est.host_memory import keep_freed_memory
line = keep_freed_memory(sys.argv[1] == "keep", sys.argv[2])
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    blocks = [torch.ones(n) for n in (1 << 16, 1 << 20, 1 << 22, 3 << 22)]  # 256 KiB .. 48 MiB
    del blocks
for _ in range(6):  # glibc settles where it places each size within 4 steps (seen here: an aligned block may not
    step()          # fit the hole it left, so the heap grows a few times first)
before = faults()
for _ in range(5):
    step()
print(json.dumps({"line": line, "faults_per_step": (faults() - before) / 5}))
"""


def _run(mode: str, device: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode, device], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_stops_page_faults_and_glibc_defaults_do_not():
    kept, default = _run("keep", "cpu"), _run("system", "cpu")
    # 76 MiB allocated per step = 19,500 pages of 4 KiB: glibc's default faults most of them in again every step
    assert default["faults_per_step"] > 10_000, default
    assert kept["faults_per_step"] < 100, kept
    assert kept["line"] == "freed blocks kept for reuse (glibc)"
    assert default["line"] == "glibc defaults (--no-keep-host-memory)"


def test_gpu_ranks_keep_glibc_defaults():
    gpu = _run("keep", "cuda")
    assert gpu["line"] == "glibc defaults (GPU rank)"
    assert gpu["faults_per_step"] > 10_000, gpu  # nothing was changed


def test_header_line_names_the_choice():
    assert keep_freed_memory(False, "cpu") == "glibc defaults (--no-keep-host-memory)"
