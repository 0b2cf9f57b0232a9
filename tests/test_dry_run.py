"""--dry-run (planning/dry_run.py): published parameter counts from the meta-device model, one-line refusals,
and TinyLlama-1.1B at TP 2 x PP 2 x DP 16 in seconds and well under 1 GB."""
import os
import resource
import subprocess
import sys

import pytest

from megatron_est.config import Config, ParallelConfig, model_preset
from megatron_est.planning.dry_run import main
from megatron_est.planning.params import all_rank_params, model_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (4, 1), (1, 2)])
def test_tinyllama_has_its_published_parameter_count_in_every_layout(tp, pp):
    cfg = Config(model=model_preset("tinyllama-1.1b"),
                 parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    ranks = all_rank_params(cfg)
    assert model_parameters(ranks) == 1_100_048_384
    # By hand: a layer is 40 x 64 x 2048 (fused QKV, 32 query + 2 x 4 KV heads) + 2048^2 (projection)
    # + 3 x 2048 x 5632 (SwiGLU) sharded over TP, plus two 2048 norms on every TP rank.
    per_layer = (40 * 64 * 2048 + 2048 ** 2 + 3 * 2048 * 5632) // tp + 2 * 2048
    first = ranks[0]
    assert first.layers == per_layer * 22 // pp and first.embedding == 32000 * 2048 // tp


@pytest.mark.parametrize("pp", [1, 2])
def test_gpt2_124m_has_its_published_parameter_count(pp):
    cfg = Config(model=model_preset("gpt2-124m", make_vocab_size_divisible_by=1),
                 parallel=ParallelConfig(pipeline_model_parallel_size=pp))
    ranks = all_rank_params(cfg)
    assert model_parameters(ranks) == 124_439_808
    if pp == 2:  # tied: the last stage holds a copy of the word embedding as its LM head
        assert ranks[1].duplicate == ranks[1].lm_head == 50257 * 768


def test_dry_run_prints_counts_flops_and_memory(capsys):
    assert main(["--model-preset", "gpt2-124m", "--make-vocab-size-divisible-by", "1", "--world-size", "8",
                 "--pipeline-model-parallel-size", "2", "--micro-batch-size", "4", "--global-batch-size", "64",
                 "--est-schedule", "gpt2-paper", "--train-iters", "50000", "--deepspeed", "--zero-stage", "1",
                 "--bf16"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 124,439,808 in all" in out and "world 8 = TP 1 x PP 2 x DP 4" in out
    assert "tokens per step: 65,536" in out and "DeepSpeed ZeRO-1" in out
    assert "| 1 | 0.5,0.5,0.5 |" in out and "| 3 | 1,1,1 |" in out and "% saved" in out


@pytest.mark.parametrize("argv,flag", [
    (["--model-preset", "tinyllama-1.1b", "--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3"),
    (["--model-preset", "tinyllama-1.1b", "--pipeline-model-parallel-size", "4"], "--num-layers 22"),
    (["--world-size", "6", "--tensor-model-parallel-size", "4"], "world size 6"),
    (["--world-size", "0"], "--world-size must be >= 1, got 0"),
    (["--world-size", "4", "--micro-batch-size", "3", "--global-batch-size", "8"], "--global-batch-size 8"),
])
def test_impossible_layouts_are_refused_with_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and flag in lines[0] and out.out == ""


def test_tinyllama_tp2_pp2_dp16_in_seconds_and_under_1_gb():
    # CPU seconds, not wall time: this machine's 2 cores are shared, and the limit is about the work done.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "megatron_est.planning.dry_run", "--model-preset", "tinyllama-1.1b",
                           "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                           "--world-size", "64", "--micro-batch-size", "4", "--global-batch-size", "1024", "--bf16",
                           "--est-schedule", "tinyllama-paper", "--train-iters", "50000"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert proc.returncode == 0, proc.stderr
    assert "parameters: 1,100,048,384 in all" in proc.stdout
    assert cpu_s < 10 and after.ru_maxrss < 2 ** 20  # ru_maxrss in KiB: under 1 GiB (the largest child so far)


def test_entry_points_take_dry_run_before_any_process_group(monkeypatch, capsys):
    from megatron_est.parallel import state as pstate
    from megatron_est.training.pretrain import main as pretrain_main

    monkeypatch.setattr(pstate, "initialize", lambda *a, **k: pytest.fail("process groups were built"))
    with pytest.raises(SystemExit) as e:
        pretrain_main(["--dry-run", "--model-preset", "tinyllama-1.1b", "--world-size", "16",
                       "--tensor-model-parallel-size", "2"], default_preset="llama-tiny")
    assert e.value.code == 0 and "parameters: 1,100,048,384 in all" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        pretrain_main(["--dry-run", "--model-preset", "tinyllama-1.1b", "--tensor-model-parallel-size", "3"])
    out = capsys.readouterr()
    assert e.value.code == 2 and out.out == ""
    assert out.err.strip().splitlines() == ["error: --num-attention-heads 32 is not divisible by "
                                            "--tensor-model-parallel-size 3"]


def test_pretrain_llama_dry_run_from_the_command_line():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_llama.py"), "--dry-run", "--model-preset",
                           "tinyllama-1.1b", "--world-size", "64", "--tensor-model-parallel-size", "2",
                           "--pipeline-model-parallel-size", "2"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "world 64 = TP 2 x PP 2 x DP 16" in proc.stdout and "1,100,048,384" in proc.stdout
