"""examples/: the DeepSpeed JSONs pass our config check with the flags they are meant for (and train, slow tier);
the sbatch scripts' training arguments pass our validation at their default layout; the scripts refuse a CPU
fallback they were not asked for. The scripts under a real Slurm: tests/test_slurm.py."""
import glob
import json
import os
import shutil
import subprocess

import pytest

from megatron_est.arguments import parse_args
from megatron_est.config import ConfigError
from megatron_est.validation import validate
from megatron_est.training.deepspeed_config import resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_DIR = os.path.join(ROOT, "examples", "deepspeed")
SLURM_DIR = os.path.join(ROOT, "examples", "slurm")
JSONS = {"zero1.json": 1, "zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}
SCRIPTS = {"pretrain_gpt2_124m.sbatch": "gpt2-tiny", "pretrain_gpt2_124m_per_task.sbatch": "gpt2-tiny",
           "pretrain_tinyllama_1.1b.sbatch": "llama-tiny"}
NODES, GPUS = 2, 8  # the scripts' #SBATCH defaults


def test_the_example_files_are_all_covered():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(DS_DIR, "*.json"))) == sorted(JSONS)
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(SLURM_DIR, "*.sbatch"))) == sorted(SCRIPTS)


# ------------------------------------------------------------------------------------------ sbatch scripts
def _script_env(**kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(MEGATRON_EST_DIR=ROOT, SLURM_GPUS_ON_NODE=str(GPUS), **kw)
    return env


def script_args(script: str, **env) -> list[str]:
    """The training arguments a script passes (DRY_RUN=1 prints them, one per line)."""
    out = subprocess.run(["bash", os.path.join(SLURM_DIR, script)], env=_script_env(DRY_RUN="1", **env),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_sbatch_script_syntax(script):
    subprocess.run(["bash", "-n", os.path.join(SLURM_DIR, script)], check=True)


def test_slurm_local_script_syntax():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "slurm_local.sh")], check=True)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_sbatch_arguments_validate_at_the_default_layout(script):
    """What the script launches on 2 nodes x 8 GPUs passes every up-front check (DeepSpeed JSON included)."""
    args = script_args(script)
    cfg = validate(parse_args(args, "x", SCRIPTS[script]), NODES * GPUS).config  # bf16/stage as resolved
    assert cfg.checkpoint.save == cfg.checkpoint.load and cfg.checkpoint.exit_signal_handler
    assert cfg.est.schedule in ("gpt2-paper", "tinyllama-paper")
    assert cfg.parallel.distributed_backend == "nccl"  # never a silent CPU fallback
    if "tinyllama" in script:
        assert cfg.model.num_layers == 22 and cfg.engine.deepspeed and cfg.engine.bf16  # bf16 from the JSON
        assert os.path.basename(cfg.engine.deepspeed_config) == "zero2.json"
        assert cfg.data.data_path[0] == "0.7" and len(cfg.data.data_path) == 4
    else:
        assert cfg.model.num_layers == 12 and cfg.parallel.tensor_model_parallel_size == 2
        assert cfg.data.tokenizer_type == "GPT2BPETokenizer" and os.path.exists(cfg.data.vocab_file)


def test_extra_args_override_the_script():
    args = script_args("pretrain_gpt2_124m.sbatch", TP="1", EXTRA_ARGS="--num-layers 2 --train-iters 7")
    cfg = parse_args(args, "x", "gpt2-tiny")
    assert (cfg.model.num_layers, cfg.train.train_iters, cfg.parallel.tensor_model_parallel_size) == (2, 7, 1)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_sbatch_refuses_nccl_without_gpu_and_unknown_backends(script, tmp_path):
    path = os.path.join(SLURM_DIR, script)
    env = _script_env(VOCAB_FILE="v", MERGE_FILE="m", RUN_DIR=str(tmp_path / "run"))
    bad = subprocess.run(["bash", path], env={**env, "BACKEND": "mpi"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "BACKEND must be nccl or gloo" in bad.stderr
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        pytest.skip("this machine has a GPU")
    out = subprocess.run(["bash", path], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "BACKEND=nccl but nvidia-smi finds no GPU" in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------ DeepSpeed JSON
def _tinyllama_cfg(ds_json: str, tp: int = 1, pp: int = 1, **kw):
    env = dict(DS_CONFIG=ds_json, TP=str(tp), PP=str(pp), **kw)
    return parse_args(script_args("pretrain_tinyllama_1.1b.sbatch", **env), "x", "llama-tiny")


@pytest.mark.parametrize("name", sorted(JSONS))
@pytest.mark.parametrize("tp", [1, 2])
def test_deepspeed_json_resolves_with_the_recipe_flags(name, tp):
    path = os.path.join(DS_DIR, name)
    cfg = _tinyllama_cfg(path, tp=tp)
    resolved = validate(cfg, NODES * GPUS)  # the check pretrain runs before any process group exists
    dp = NODES * GPUS // tp
    conf = resolve_config(cfg, tp, 1, dp)
    assert conf["train_batch_size"] == 512 and conf["train_micro_batch_size_per_gpu"] == 4
    assert conf["gradient_accumulation_steps"] == 512 // (4 * dp)
    assert conf["gradient_clipping"] == 1.0 and conf["bf16"] == {"enabled": True}
    assert conf["zero_optimization"]["stage"] == JSONS[name] == resolved.zero_stage
    offload = conf["zero_optimization"].get("offload_optimizer")
    assert (offload is not None) == ("offload" in name)
    if offload:  # our torch AdamW (no "optimizer" section) on offloaded state
        assert "optimizer" not in conf and conf["zero_force_ds_cpu_optimizer"] is False
    # The file itself is untouched: resolving works on a copy.
    assert json.load(open(path))["train_batch_size"] == "auto"


@pytest.mark.parametrize("name", sorted(JSONS))
def test_deepspeed_json_with_pipeline_parallelism(name):
    cfg = _tinyllama_cfg(os.path.join(DS_DIR, name), pp=2)
    if JSONS[name] == 1:
        validate(cfg, NODES * GPUS)
    else:
        with pytest.raises(ConfigError, match=f"ZeRO stage {JSONS[name]} with --pipeline-model-parallel-size 2"):
            validate(cfg, NODES * GPUS)


@pytest.mark.parametrize("name", sorted(JSONS))
def test_deepspeed_json_with_numbers_is_checked_against_the_flags(name, tmp_path):
    conf = json.load(open(os.path.join(DS_DIR, name)))
    conf.update(train_batch_size=512, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=8)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(conf))
    validate(_tinyllama_cfg(str(good)), NODES * GPUS)  # 512 = 4 x 16 x 8
    with pytest.raises(ConfigError, match="gradient_accumulation_steps 8 disagrees"):
        validate(_tinyllama_cfg(str(good)), 2 * NODES * GPUS)  # 4 nodes: accumulation 4
    conf["train_batch_size"] = 256
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="train_batch_size 256 disagrees with --global-batch-size 512"):
        validate(_tinyllama_cfg(str(bad)), NODES * GPUS)


# ------------------------------------------------------------------------------ DeepSpeed JSON: training
def _train_worker(rank, world):
    from tests.engine_harness import make_cfg, parallel_state, run_deepspeed, run_plain

    st = parallel_state(rank, world, make_cfg())
    out = {"plain_bf16": run_plain(make_cfg(engine={"bf16": True}), st)}
    for name in sorted(JSONS):
        out[name] = run_deepspeed(make_cfg(engine={"deepspeed_config": os.path.join(DS_DIR, name)}), st)
    return out


@pytest.mark.slow
def test_deepspeed_json_trains_like_the_plain_engine():
    """Each JSON as is, DP=2 on CPU (gloo), EST crossing all three stages: the plain engine's bf16 curve +- 0.05."""
    pytest.importorskip("deepspeed")
    from tests.helpers import run_distributed

    for r in run_distributed(_train_worker, 2):
        for name in JSONS:
            for it in range(1, 9):
                assert abs(r[name]["losses"][it] - r["plain_bf16"]["losses"][it]) < 0.05, (name, it)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_sbatch_launches_the_tuners_plan(script, tmp_path, capsys):
    """Plan -> launch in one step: PLAN=DIR makes a script launch exactly what tools/tune_deepspeed.py chose,
    and a plan tuned for another number of nodes is refused with one line."""
    from tools.tune_deepspeed import main as tune

    preset = {"gpt2-tiny": "gpt2-124m", "llama-tiny": "tinyllama-1.1b"}[SCRIPTS[script]]
    best = tune(["--model-preset", preset, "--nodes", str(NODES), "--gpus-per-node", str(GPUS),
                 "--gpu-memory-gib", "24", "--global-batch-size", "512", "--train-iters", "1000",
                 "--out", str(tmp_path)])
    capsys.readouterr()
    args = script_args(script, PLAN=str(tmp_path))
    cfg = parse_args(args, "x", SCRIPTS[script])
    validate(cfg, NODES * GPUS)  # reads the plan's DeepSpeed JSON too
    assert cfg.engine.deepspeed_config == str(tmp_path / "ds_config.json")
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
            cfg.train.micro_batch_size) == (best.cand.tp, best.cand.pp, best.cand.micro_batch)
    other = subprocess.run(["bash", os.path.join(SLURM_DIR, script)], capture_output=True, text=True, timeout=60,
                           env=_script_env(DRY_RUN="1", PLAN=str(tmp_path), SLURM_NNODES="4"))
    assert other.returncode == 1 and other.stderr.strip().splitlines() == [
        f"error: PLAN={tmp_path} was tuned for {NODES} nodes but this job has 4: sbatch --nodes={NODES}"]
