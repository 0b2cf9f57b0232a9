"""--eval-tasks during training at data-parallel size 2, in the plain engine and under DeepSpeed ZeRO-3 (every
rank scores the same requests; under ZeRO-3 through the engine, which gathers the partitioned weights): the
logged zero-shot figures equal a one-process run's with the same global batch (the same training)."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, free_port
from tests.test_scalar_logs import _gpt2_corpus

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def _run(tmp_path, name: str, world: int, extra: list) -> list:
    from megatron_est.data.tokenizers import gpt2_files

    vocab, merges = gpt2_files()
    metrics = tmp_path / f"{name}.jsonl"
    argv = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size",
            "4", "--train-iters", "4", "--log-interval", "2", "--eval-interval", "4", "--eval-iters", "1",
            "--lr-warmup-iters", "1", "--est-schedule", "none", "--data-path", _gpt2_corpus(tmp_path),
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
            "--data-cache-dir", str(tmp_path / "cache"), "--num-threads", "1", "--metrics-file", str(metrics),
            "--eval-tasks", "arc_easy,lambada", "--eval-limit", "4", *extra]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    port = str(free_port())
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
             for r in range(world)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for r, (p, err) in enumerate(zip(procs, errs)):
        assert p.returncode == 0, f"rank {r}: " + "\n".join(e[-2000:] for e in errs)
    return [r["downstream"] for r in map(json.loads, metrics.read_text().splitlines()) if "downstream" in r]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["plain", "zero3"])
def test_eval_tasks_at_dp2_equal_one_process(tmp_path, engine):
    pytest.importorskip("lm_eval")
    extra = [] if engine == "plain" else ["--deepspeed", "--zero-stage", "3"]
    one = _run(tmp_path, "one", 1, [])
    two = _run(tmp_path, "two", 2, extra)
    assert len(one) == len(two) == 1
    for task, metrics in one[0].items():
        for metric, value in metrics.items():
            assert two[0][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
