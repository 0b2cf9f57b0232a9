"""Every script outside the package compiles (benchmarks and tools are not imported by the other tests: a
syntax error in bench/bench_freeze.py went unnoticed for a session)."""
import glob
import os
import py_compile

import pytest

from tests.helpers import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "bench", "*.py")) + glob.glob(os.path.join(ROOT, "tools", "*.py"))
                 + glob.glob(os.path.join(ROOT, "scripts", "*.py")) + glob.glob(os.path.join(ROOT, "*.py")))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_compiles(path, tmp_path):
    py_compile.compile(path, cfile=str(tmp_path / "out.pyc"), doraise=True)
