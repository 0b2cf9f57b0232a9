"""Launching as a cluster user does: DeepSpeed on one process, one process per Slurm task, a rank that crashes,
and ranks that wait for rank 0's data-index build outside any collective. Real processes, gloo, DeepSpeed."""
import os
import subprocess
import sys
import time

import pytest
import torch.multiprocessing as mp

from megatron_est.data.default_corpus import prepare_default_corpus
from tests.helpers import ROOT, free_port

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--train-iters", "6", "--log-interval", "3", "--eval-interval", "6",
        "--eval-iters", "1", "--num-threads", "1"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NNODES")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One data cache for the module: the bundled corpus and tokenizer are built once, here."""
    path = str(tmp_path_factory.mktemp("cache"))
    prepare_default_corpus(path)
    return path


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **extra}


def _start(argv, tmp_path, env) -> tuple[subprocess.Popen, str]:
    """Start a process with stdout and stderr in files (a full pipe would block it)."""
    base = str(tmp_path / f"proc{len(list(tmp_path.glob('proc*.out')))}")
    with open(base + ".out", "w") as so, open(base + ".err", "w") as se:
        return subprocess.Popen([sys.executable, *argv], stdout=so, stderr=se, env=env, cwd=str(tmp_path)), base


def _finish(procs, timeout) -> list[tuple[int, str, str]]:
    """Wait for every process (killing all of them after `timeout` seconds in all): (rc, stdout, stderr)."""
    deadline = time.monotonic() + timeout
    try:
        for p, _ in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p, _ in procs:
            p.kill()
        pytest.fail(f"still running after {timeout} s (a hang)")
    return [(p.returncode, open(base + ".out").read(), open(base + ".err").read()) for p, base in procs]


def test_deepspeed_on_one_process_trains_twice_at_once(tmp_path, cache):
    """No launcher, no MASTER_PORT: each run makes its own one-process group on a port the OS picks, so two
    such runs on one machine do not collide."""
    script = os.path.join(ROOT, "pretrain_gpt.py")
    argv = [script, *TINY, "--global-batch-size", "2", "--deepspeed", "--zero-stage", "1",
            "--data-cache-dir", cache]
    runs = _finish([_start(argv, tmp_path, _env()) for _ in range(2)], timeout=240)
    for rc, so, se in runs:
        assert rc == 0, se[-3000:]
        assert "DeepSpeed engine: ZeRO stage 1" in so and "done: 6 iterations" in so


def test_slurm_per_task_launch_with_deepspeed_trains_on_two_processes(tmp_path, cache):
    """srun's variables only (no RANK, WORLD_SIZE, LOCAL_RANK), as pretrain_gpt2_124m_per_task.sbatch runs."""
    argv = [os.path.join(ROOT, "pretrain_gpt.py"), *TINY, "--global-batch-size", "4", "--deepspeed",
            "--zero-stage", "1", "--data-cache-dir", cache]
    port = str(free_port())
    procs = [_start(argv, tmp_path, _env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                                         SLURM_NNODES="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    runs = _finish(procs, timeout=240)
    for rc, _, se in runs:
        assert rc == 0, se[-3000:]
    assert "TP=1 PP=1 DP=2" in runs[0][1] and "done: 6 iterations" in runs[0][1]


# Rank 1 raises at the start of iteration 3 while rank 0 is already inside that step's data-parallel gradient
# all-reduce (gloo); the time of the raise goes to a file so the test can time the exits from it.
CRASH = """
import sys, time
from megatron_est.training import engine, pretrain
real_step = engine.TorchEngine.step
def failing_step(self, batches, sub, step, timer=None):
    if self.st.rank == 1 and step == 2:
        open(sys.argv[1], "w").write(repr(time.time()))
        raise RuntimeError("injected failure at iteration 3")
    return real_step(self, batches, sub, step, timer)
engine.TorchEngine.step = failing_step
pretrain.main(sys.argv[2:])
"""


def test_a_rank_that_raises_ends_the_whole_job_within_seconds(tmp_path, cache):
    (tmp_path / "crash.py").write_text(CRASH)
    stamp = tmp_path / "raised_at"
    argv = [str(tmp_path / "crash.py"), str(stamp), *TINY, "--global-batch-size", "4", "--train-iters", "20",
            "--data-cache-dir", cache]
    port = str(free_port())
    procs = [_start(argv, tmp_path, _env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                         MASTER_PORT=port)) for r in range(2)]
    runs = _finish(procs, timeout=90)  # the old exit path waited in a barrier for the 10-minute timeout
    exited = time.time()
    raised = float(stamp.read_text())
    (rc0, _, err0), (rc1, _, err1) = runs
    assert rc0 != 0 and rc1 != 0
    assert err1.strip().splitlines()[-1] == "error: rank 1: RuntimeError: injected failure at iteration 3", err1
    last0 = err0.strip().splitlines()[-1]
    assert last0.startswith("error: rank 0: lost contact with the other ranks"), err0  # gloo's words vary
    assert "Traceback" not in err0  # the peer's line is all it prints; the cause is rank 1's
    assert exited - raised < 10, f"{exited - raised:.1f} s from the raise to the end of both processes"


def _wait_worker(rank, port, cache, prefix, out):
    """Rank 0's build is slowed or fails; what each rank saw goes to out/rank{rank}.txt."""
    import datetime

    import torch.distributed as dist

    from megatron_est.data import builder
    from megatron_est.data.errors import DataError

    real_build = builder._build_all

    def slow(delay, error=None):
        def build(*args, **kwargs):
            time.sleep(delay)
            if error is not None:
                raise error
            return real_build(*args, **kwargs)
        return build

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=4))
    seen = []
    cases = [("slow", 6.0, None, 600.0), ("fails", 0.0, OSError("disk full"), 600.0),
             ("hangs", 5.0, DataError("gave up"), 1.5)]
    for name, delay, error, timeout_s in cases:
        builder._build_all = slow(delay, error) if rank == 0 else real_build
        t0 = time.monotonic()
        try:
            train, _, _ = builder.build_train_valid_test_datasets([prefix], "1", 16, 1, (20, 0, 0), cache,
                                                                  timeout_s=timeout_s)
            seen.append(f"{name}: ok {len(train)}")
        except Exception as e:
            seen.append(f"{name}: {type(e).__name__}: {e} after {time.monotonic() - t0:.0f} s")
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(seen))
    dist.destroy_process_group()


def test_other_ranks_wait_for_rank0s_index_build_outside_collectives(tmp_path):
    """A build longer than the process-group timeout (4 s) is waited for; rank 0's failure reaches rank 1 at
    once; a rank 0 that never finishes makes rank 1 give up after timeout_s (the distributed timeout)."""
    from tests.data.test_data_gpt_dataset import _unique_token_dataset

    prefix, _ = _unique_token_dataset(str(tmp_path / "u"))
    mp.start_processes(_wait_worker, args=(free_port(), str(tmp_path / "cache"), prefix, str(tmp_path)),
                       nprocs=2, start_method="spawn")
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(2))
    assert r0[0].startswith("slow: ok") and r1[0] == r0[0]
    assert r0[1].startswith("fails: OSError: disk full")
    assert r1[1].startswith("fails: DataError: rank 0 failed to build the datasets: disk full after ")
    assert r0[2].startswith("hangs: DataError: gave up")
    assert r1[2].startswith("hangs: DataError: rank 0 did not finish building the sample indices") and \
        "within 0.025 minutes (--distributed-timeout-minutes;" in r1[2]
    for line in (r1[1], r1[2]):  # rank 1 heard at once / gave up at its deadline, not at rank 0's end
        assert float(line.split(" after ")[1].split()[0]) < 3, line


def test_vocabulary_scan_runs_once_per_dataset_and_vocabulary(tmp_path, monkeypatch):
    """Rank 0's scan of the whole .bin (minutes for a TinyLlama-sized corpus) is not repeated on a restart."""
    from megatron_est.data.builder import build_train_valid_test_datasets
    from megatron_est.data.errors import DataError
    from megatron_est.data.indexed_dataset import IndexedDataset
    from tests.data.test_data_gpt_dataset import _unique_token_dataset

    prefix, n_tokens = _unique_token_dataset(str(tmp_path / "u"))
    scans = []
    real_check = IndexedDataset.check_vocab
    monkeypatch.setattr(IndexedDataset, "check_vocab", lambda ds, v, *a: (scans.append(v), real_check(ds, v, *a)))
    for _ in range(2):  # a start and a restart
        build_train_valid_test_datasets([prefix], "1", 8, 1, (10, 0, 0), str(tmp_path / "cache"), vocab_size=n_tokens)
    assert scans == [n_tokens]
    with pytest.raises(DataError, match="outside the tokenizer's vocabulary"):  # another vocabulary: scanned
        build_train_valid_test_datasets([prefix], "1", 8, 1, (10, 0, 0), str(tmp_path / "cache"), vocab_size=50)
    assert scans == [n_tokens, 50]


SRUN_TASK = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
             "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}


@pytest.mark.parametrize("env,expected", [
    (SRUN_TASK, (3, 4, 1)),  # one process per task of an srun step
    ({**SRUN_TASK, "SLURM_NTASKS": "8"}, (3, 4, 1)),  # a 4-task step in an 8-task job
    ({k: v for k, v in SRUN_TASK.items() if "STEP" not in k and k != "SLURM_JOB_ID"}, (3, 4, 1)),  # emulated
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}, (0, 1, 0)),  # sbatch
    ({**SRUN_TASK, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "2"}, (5, 8, 2)),  # torchrun inside srun
])
def test_rank_and_world_from_the_launcher(env, expected, monkeypatch):
    """A python started by the sbatch script itself is one process: Slurm sets SLURM_PROCID=0 and the job's
    SLURM_NTASKS there too, and it used to wait for the other 'tasks' until the timeout."""
    from megatron_est.parallel.state import env_rank_and_world

    for var in (*LAUNCH_VARS, "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert env_rank_and_world() == expected
