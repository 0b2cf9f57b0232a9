"""DeepSpeed ZeRO as the engine: same EST loss curve as the plain engine (ZeRO-1/2/3, fp32) at DP=2 and at
TP=2 x DP=2 (ZeRO-1 also at PP 2, and at PP 4 with stages that run no layer), the ZeRO-3 stale-gradient fix,
exact resume from DeepSpeed checkpoints, export of a ZeRO-3 checkpoint, bf16 and optimizer offload; bad input
refused up front with one line."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_est.config import ConfigError
from megatron_est.validation import validate
from megatron_est.est.build import build_sampler
from megatron_est.training import deepspeed_config
from tests.engine_harness import make_cfg, parallel_state, run_deepspeed, run_plain, with_checkpoint
from tests.helpers import run_distributed

pytest.importorskip("deepspeed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ds(cfg_kw=None, **engine):
    return make_cfg(**(cfg_kw or {}), engine={"deepspeed": True, **engine})


def _assert_same_curve(got, ref, what):
    for it in range(1, 9):
        assert abs(got["losses"][it] - ref["losses"][it]) <= 2e-6 + 1e-6 * abs(ref["losses"][it]), (what, it)
    for a, b in zip(got["records"], ref["records"]):
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * (1 + b["grad_norm"]), (what, a["iteration"])
    assert abs(got["val_loss"] - ref["val_loss"]) < 1e-5, what


# ------------------------------------------------------------------------------------------------ DP = 2
def _dp2_worker(rank, world, ckdir):
    import megatron_est.training.deepspeed_engine as dse

    cfg = make_cfg()
    st = parallel_state(rank, world, cfg)
    out = {"plain": run_plain(cfg, st)}
    for stage in (0, 1, 2, 3):
        out[f"zero{stage}"] = run_deepspeed(_ds(zero_stage=stage), st)
    # Negative control: ZeRO-3 without zeroing skipped layers' gradient partitions (DeepSpeed's stale values).
    fix = dse.zero_stale_gradients
    dse.zero_stale_gradients = lambda run, params: None
    out["zero3_unfixed"] = run_deepspeed(_ds(zero_stage=3), st)
    dse.zero_stale_gradients = fix
    for stage in (1, 2, 3):
        out[f"zero{stage}_offload"] = run_deepspeed(_ds(zero_stage=stage, offload_optimizer=True), st)
    out["zero3_recompute"] = run_deepspeed(_ds(zero_stage=3, recompute_granularity="full"), st)
    # Checkpoint/resume in DeepSpeed's format (ZeRO-3): SIGTERM-free exit at 4, resume to 8.
    z3 = _ds(zero_stage=3)
    out["z3_first"] = run_deepspeed(with_checkpoint(z3, save=ckdir, exit_interval=4), st)
    out["z3_second"] = run_deepspeed(with_checkpoint(z3, save=ckdir, load=ckdir), st)
    # bf16: DeepSpeed's bf16 mode against the plain engine's bf16 autocast (close, not equal).
    out["bf16_plain"] = run_plain(make_cfg(engine={"bf16": True}), st)
    out["bf16_zero1"] = run_deepspeed(_ds(zero_stage=1, bf16=True), st)
    return out


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    ckdir = str(tmp_path_factory.mktemp("ds_ckpt"))
    return ckdir, run_distributed(_dp2_worker, 2, ckdir)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_matches_plain_engine_dp2(dp2, stage):
    for r in dp2[1]:
        _assert_same_curve(r[f"zero{stage}"], r["plain"], f"zero{stage}")


def test_zero3_needs_the_stale_gradient_fix(dp2):
    r = dp2[1][0]
    diffs = [abs(r["zero3_unfixed"]["losses"][it] - r["plain"]["losses"][it]) for it in range(1, 9)]
    assert max(diffs) > 1e-4  # a layer skipped at step 3 would be updated with its step-2 gradient again


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_with_optimizer_offload_matches(dp2, stage):
    for r in dp2[1]:
        _assert_same_curve(r[f"zero{stage}_offload"], r["plain"], f"zero{stage} + offload")


def test_zero3_with_full_recompute_matches(dp2):
    for r in dp2[1]:
        _assert_same_curve(r["zero3_recompute"], r["plain"], "zero3 + recompute")


def test_deepspeed_checkpoint_resumes_exactly(dp2):
    ckdir, results = dp2
    for r in results:
        assert r["z3_first"]["end"] == 4 and r["z3_second"]["start"] == 4
        for it in range(1, 5):
            assert r["z3_first"]["losses"][it] == r["zero3"]["losses"][it]
        for it in range(5, 9):
            assert r["z3_second"]["losses"][it] == r["zero3"]["losses"][it], it
        torch.testing.assert_close(r["z3_second"]["rand"], r["z3_first"]["rand"], rtol=0, atol=0)
    files = sorted(os.listdir(os.path.join(ckdir, "iter_0000008")))
    assert "est_state_mp_rank_00.pt" in files and "metadata.json" in files
    assert any(f.endswith("_optim_states.pt") for f in files)  # DeepSpeed's own format
    assert open(os.path.join(ckdir, "latest")).read().strip() == "iter_0000008"
    assert open(os.path.join(ckdir, "latest_checkpointed_iteration.txt")).read().strip() == "8"


def test_zero3_checkpoint_exports_to_transformers(dp2, tmp_path):
    ckdir, results = dp2
    _check_export(ckdir, tmp_path / "hf", results[0]["z3_second"]["val_loss"])


def test_bf16_deepspeed_close_to_plain_bf16(dp2):
    r = dp2[1][0]
    for it in range(1, 9):
        assert abs(r["bf16_zero1"]["losses"][it] - r["bf16_plain"]["losses"][it]) < 0.05, it


# -------------------------------------------------------------------------------------------- TP2 x DP2
def _tp2_worker(rank, world):
    cfg = make_cfg(tp=2)
    st = parallel_state(rank, world, cfg)
    out = {"plain": run_plain(cfg, st)}
    for stage in (0, 1, 2, 3):
        out[f"zero{stage}"] = run_deepspeed(_ds({"tp": 2}, zero_stage=stage), st)
    return out


def test_zero_matches_plain_engine_tp2_dp2():
    for r in run_distributed(_tp2_worker, 4):
        for stage in (0, 1, 2, 3):
            _assert_same_curve(r[f"zero{stage}"], r["plain"], f"tp2 zero{stage}")


# ------------------------------------------------------------------------------------------- bad input
def test_deepspeed_json_accepted_as_is_and_checked(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                                "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
                                "bf16": {"enabled": True}, "gradient_clipping": 0.5}))
    cfg = make_cfg(engine={"deepspeed_config": str(good)})
    assert cfg.engine.deepspeed  # --deepspeed_config implies --deepspeed
    resolved = validate(cfg, 2)
    conf = deepspeed_config.resolve_config(cfg, 1, 1, 2)
    assert conf["zero_optimization"] == {"stage": 2} and conf["gradient_clipping"] == 0.5
    assert resolved.precision == "bf16" and resolved.zero_stage == 2 and not cfg.engine.bf16  # cfg untouched
    assert resolved.config.engine.bf16 and resolved.config.engine.zero_stage == 2
    bad = [({"train_batch_size": 16}, "train_batch_size 16 disagrees with --global-batch-size 8"),
           ({"train_micro_batch_size_per_gpu": 4}, "disagrees with --micro-batch-size 2"),
           ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps 1 disagrees"),
           ({"zero_optimization": {"stage": 5}}, "stage must be 0, 1, 2 or 3"),
           ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "enables both")]
    for conf, needle in bad:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(conf))
        with pytest.raises(ConfigError, match=needle):
            validate(make_cfg(engine={"deepspeed_config": str(path)}), 2)
    (tmp_path / "broken.json").write_text('{"train_batch_size": 8,,}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        validate(make_cfg(engine={"deepspeed_config": str(tmp_path / "broken.json")}), 2)
    with pytest.raises(ConfigError, match="cannot read"):
        validate(make_cfg(engine={"deepspeed_config": str(tmp_path / "missing.json")}), 2)
    with pytest.raises(ConfigError, match="--zero-stage 1"):
        validate(make_cfg(engine={"deepspeed_config": str(good), "zero_stage": 1}), 2)


def test_refusals_up_front(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="DeepSpeed supports ZeRO-1 only"):
        validate(make_cfg(pp=2, engine={"deepspeed": True, "zero_stage": 3}), 4)
    with pytest.raises(ConfigError, match="ZeRO stage 2 with --pipeline-model-parallel-size 2"):
        validate(make_cfg(pp=2, engine={"deepspeed": True, "zero_stage": 2}), 4)
    validate(make_cfg(pp=2, engine={"deepspeed": True, "zero_stage": 1}), 4)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a GPU"):
            validate(make_cfg(engine={"deepspeed": True, "fp16": True}), 2)
    with pytest.raises(ConfigError, match="need --deepspeed"):
        validate(make_cfg(engine={"zero_stage": 2}), 2)
    monkeypatch.setattr(deepspeed_config, "deepspeed_installed", lambda: False)
    with pytest.raises(ConfigError, match="DeepSpeed is not installed"):
        validate(make_cfg(engine={"deepspeed": True}), 2)


def _cli(args, env_extra=None, block_deepspeed=False):
    code = ("import sys; sys.path.insert(0, %r)\n" % ROOT
            + ("sys.modules['deepspeed'] = None\n" if block_deepspeed else "")
            + "from megatron_est.training.pretrain import main\nmain(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": ROOT, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_refuses_with_one_line_and_writes_nothing(tmp_path):
    save = tmp_path / "save"
    save.mkdir()
    (save / "keep.txt").write_text("x")
    (tmp_path / "ds.json").write_text("not json")
    cases = [(["--deepspeed_config", str(tmp_path / "ds.json")], "not valid JSON"),
             (["--deepspeed", "--zero-stage", "3", "--pipeline-model-parallel-size", "2", "--num-layers", "4"],
              "supports ZeRO-1 only"),
             (["--load", str(tmp_path / "missing")], "does not exist")]
    for extra, needle in cases:
        env = {"WORLD_SIZE": "2", "RANK": "0"} if "--pipeline-model-parallel-size" in extra else {}
        proc = _cli(["--save", str(save), "--train-iters", "10", *extra], env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
        assert sorted(os.listdir(save)) == ["keep.txt"]
    proc = _cli(["--deepspeed", "--save", str(save)], block_deepspeed=True)
    assert proc.returncode == 2 and "DeepSpeed is not installed" in proc.stderr, proc.stderr[-2000:]


def test_plain_engine_never_imports_deepspeed():
    code = ("import sys; sys.path.insert(0, %r)\nsys.modules['deepspeed'] = None  # as if not installed\n"
            "from megatron_est.parallel.state import ParallelState\n"
            "from tests.engine_harness import make_cfg, run_plain\n"
            "from megatron_est.training import pretrain, checkpointing, precision  # noqa\n"
            "r = run_plain(make_cfg(iters=2, engine={'bf16': True}), ParallelState())\n"
            "print('ok', r['end'])\n" % ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0 and "ok 2" in proc.stdout, proc.stderr[-2000:]


# ------------------------------------------------------------------------------ ZeRO-1 with pipelining
def _pp_worker(rank, world, tp, ckdir):
    cfg = make_cfg(tp=tp, pp=2)
    st = parallel_state(rank, world, cfg)
    z1 = _ds({"tp": tp, "pp": 2}, zero_stage=1)
    out = {"plain": run_plain(cfg, st), "zero1": run_deepspeed(z1, st)}
    if ckdir:
        out["first"] = run_deepspeed(with_checkpoint(z1, save=ckdir, exit_interval=4), st)
        out["second"] = run_deepspeed(with_checkpoint(z1, save=ckdir, load=ckdir), st)
    return out


def test_zero1_with_pipeline_matches_plain_and_resumes_pp2_dp2(tmp_path):
    ckdir = str(tmp_path / "ck")
    for r in run_distributed(_pp_worker, 4, 1, ckdir):
        _assert_same_curve(r["zero1"], r["plain"], "pp2 zero1")
        assert r["first"]["end"] == 4 and r["second"]["start"] == 4
        for it in range(5, 9):
            assert r["second"]["losses"][it] == r["zero1"]["losses"][it], it
    files = sorted(os.listdir(os.path.join(ckdir, "iter_0000008")))
    assert {"est_state_mp_rank_00_000.pt", "est_state_mp_rank_00_001.pt", "mp_rank_00_model_states.pt",
            "mp_rank_01_model_states.pt"} <= set(files)
    _check_export(ckdir, tmp_path / "hf", r["second"]["val_loss"])


def _check_export(ckdir, out, val_loss):
    """Export a DeepSpeed checkpoint (stage shards merged): transformers gives our held-out loss."""
    transformers = pytest.importorskip("transformers")
    from tests.engine_harness import held_out_dataset
    from tools import convert_checkpoint as tool

    assert tool.main(["export-hf", "--load", ckdir, "--output", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    cfg = make_cfg()
    tokens = torch.stack([held_out_dataset(cfg)[i]["tokens"] for i in range(cfg.train.global_batch_size)])
    with torch.no_grad():
        logits = hf(tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(float(loss) - val_loss) < 1e-5


@pytest.mark.slow
def test_zero1_with_pipeline_matches_plain_tp2_pp2_dp2():
    for r in run_distributed(_pp_worker, 8, 2, None):
        _assert_same_curve(r["zero1"], r["plain"], "tp2 pp2 zero1")


def _pp4_worker(rank, world):
    # The default strata (one over the model) at PP 4, one layer per stage: step 0 keeps layers 0 and 3, so the
    # two middle stages run no layer and get no gradient at all (until 2026-12-01 ZeRO-1's engine.step() then
    # raised IndexError in reduce_ipg_grads; the plain engine had handled it).
    cfg = make_cfg(pp=4, iters=4)
    cfg = dataclasses.replace(cfg, est=dataclasses.replace(cfg.est, tp_strata=1, pp_strata=1))
    z1 = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, deepspeed=True, zero_stage=1))
    st = parallel_state(rank, world, cfg)
    return {"plain": run_plain(cfg, st), "zero1": run_deepspeed(z1, st), "kept": build_sampler(cfg)(0).layers}


def test_zero1_pipeline_stage_without_any_gradient_matches_plain():
    for r in run_distributed(_pp4_worker, 4):
        assert r["kept"] == (0, 3)  # stages 1 and 2 ran nothing in step 0 (and step 2)
        for it in range(1, 5):
            ref = r["plain"]["losses"][it]
            assert abs(r["zero1"]["losses"][it] - ref) <= 2e-6 + 1e-6 * abs(ref), it
        assert abs(r["zero1"]["val_loss"] - r["plain"]["val_loss"]) < 1e-5
