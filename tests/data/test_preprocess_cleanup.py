"""tools/preprocess_data.py leaves no cache or temporary file behind: SIGTERM cleans up at once, and after a
SIGKILL (which no process can handle) the next run removes what the killed one left. Real processes, real
signals."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_est.data import preprocess as pp
from megatron_est.data.corpus import shakespeare_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """All 42 Shakespeare texts, one document per line of 2,000 characters: enough work that a signal sent once
    the writer has started arrives while it runs."""
    path = tmp_path_factory.mktemp("corpus") / "plays.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for name in shakespeare_files():
            text = open(name, encoding="utf-8").read()
            for i in range(0, len(text), 2000):
                f.write(json.dumps({"text": text[i:i + 2000]}) + "\n")
    return str(path)


def _start(corpus, sp_model, out):
    return subprocess.Popen([sys.executable, TOOL, "--input", corpus, "--output-prefix", str(out / "plays"),
                             "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                             "--batch-size", "16", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})


def _wait_for_writer(proc, out) -> bool:
    """True once the run has its cache folder and has started writing tokens (False if it ended first)."""
    while proc.poll() is None:
        names = os.listdir(out)
        if any(n.startswith(".hf-cache-") for n in names) and any(
                n.endswith(".bin.tmp") and os.path.getsize(out / n) > 0 for n in names):
            return True
        time.sleep(0.02)
    return False


def _kill_mid_run(corpus, sp_model, out, sig) -> subprocess.Popen:
    proc = _start(corpus, sp_model, out)
    assert _wait_for_writer(proc, out), proc.communicate()
    os.kill(proc.pid, sig)
    proc.communicate(timeout=120)
    return proc


def test_sigterm_removes_everything(corpus, sp_model, tmp_path):
    proc = _kill_mid_run(corpus, sp_model, tmp_path, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == []


def test_next_run_removes_what_a_sigkill_left(corpus, sp_model, tmp_path):
    proc = _kill_mid_run(corpus, sp_model, tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    left = sorted(os.listdir(tmp_path))
    assert any(n.startswith(".hf-cache-") for n in left) and any(n.endswith(".bin.tmp") for n in left), left
    removed = pp.remove_stale_files(str(tmp_path), [str(tmp_path / "plays_text_document")])
    assert sorted(os.path.basename(p) for p in removed) == left
    assert os.listdir(tmp_path) == []


def test_a_live_run_keeps_its_files(tmp_path):
    """A cache folder of a process that is alive (this one), or of another host, is not touched, nor are the
    writers' temporaries while such a run may own them; a dead process's cache is removed."""
    live = tmp_path / f".hf-cache-{os.uname().nodename}-{os.getpid()}-abc"
    other_host = tmp_path / ".hf-cache-elsewhere-1-abc"
    writer_tmp = tmp_path / ".plays_text_document.xyz.bin.tmp"
    for d in (live, other_host):
        d.mkdir()
    writer_tmp.write_bytes(b"x")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".hf-cache-{os.uname().nodename}-{int(dead.stdout)}-abc"
    stale.mkdir()
    removed = pp.remove_stale_files(str(tmp_path), [str(tmp_path / "plays_text_document")])
    assert removed == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other_host.name, writer_tmp.name])
