"""Checkpoints of the plain torch engine: exact resume (EST schedule, data position, RNG), SIGTERM, atomic saves,
pruning, and refusal of missing or mismatched checkpoints."""
import json
import os
import random
import signal

import pytest
import torch
import torch.multiprocessing as mp

from megatron_est.config import ConfigError
from megatron_est.training import checkpoint_layout, checkpointing
from tests.engine_harness import make_cfg, parallel_state, run_plain, with_checkpoint
from tests.helpers import run_distributed


def _sigterm_at(step_to_signal: int, rank_to_signal: int, rank: int):
    """Hook: rank `rank_to_signal` sends itself SIGTERM while reading the first micro-batch of a step."""

    def install(model, batches, ckpt):
        get = batches.get

        def get_and_signal(step, micro):
            if rank == rank_to_signal and step == step_to_signal and micro == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            return get(step, micro)

        batches.get = get_and_signal

    return install


def _resume_worker(rank, world, tp, pp, ckdir):
    cfg = make_cfg(tp=tp, pp=pp, unsampled="freeze")  # the mode with the most state to get right
    st = parallel_state(rank, world, cfg)
    full = run_plain(cfg, st)  # uninterrupted reference
    # Interrupted: saves every 2 iterations (keeping 2), SIGTERM on one rank during iteration 5.
    cut = with_checkpoint(cfg, save=ckdir, save_interval=2, keep_last=2, exit_signal_handler=True)
    first = run_plain(cut, st, hooks=_sigterm_at(4, world - 1, rank))
    after_first = sorted(os.listdir(ckdir))
    torch.manual_seed(1000 + rank)  # scramble every RNG stream: the checkpoint must restore them
    random.seed(rank)
    second = run_plain(with_checkpoint(cfg, save=ckdir, load=ckdir, save_interval=2, keep_last=2), st)
    return {"full": full, "first": first, "second": second, "after_first": after_first,
            "after_second": sorted(os.listdir(ckdir))}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """TP=2 x PP=2 x DP=2 (8 ranks): uninterrupted, interrupted by SIGTERM, resumed."""
    ckdir = str(tmp_path_factory.mktemp("ckpt_tp2_pp2_dp2"))
    return ckdir, run_distributed(_resume_worker, 8, 2, 2, ckdir)


def test_tp2_pp2_dp2_freeze_equals_one_process(resumed):
    """Default flags (adamw) and fixed strata: TP2 x PP2 x DP2 trains the one-process loss curve."""
    from megatron_est.parallel.state import ParallelState

    one = run_plain(make_cfg(unsampled="freeze"), ParallelState())["losses"]
    for r in resumed[1]:
        assert all(abs(r["full"]["losses"][it] - one[it]) <= 1e-5 * abs(one[it]) for it in one)


def test_resume_gives_identical_losses_tp2_pp2_dp2(resumed):
    _, results = resumed
    for r in results:
        full, first, second = r["full"], r["first"], r["second"]
        assert first["end"] == 5, "SIGTERM during iteration 5 must save iteration 5 and stop"
        assert second["start"] == 5 and second["end"] == 8
        for it in range(1, 6):
            assert first["losses"][it] == full["losses"][it], it
        for it in range(6, 9):
            assert second["losses"][it] == full["losses"][it], it  # bitwise: same weights, Adam state, data, EST
        torch.testing.assert_close(second["rand"], first["rand"], rtol=0, atol=0)  # RNG restored


def test_layout_latest_pointer_and_keep_last(resumed):
    ckdir, results = resumed
    assert results[0]["after_first"] == ["iter_0000004", "iter_0000005", checkpoint_layout.LATEST_FILE]
    assert results[0]["after_second"] == ["iter_0000006", "iter_0000008", checkpoint_layout.LATEST_FILE]
    assert open(os.path.join(ckdir, checkpoint_layout.LATEST_FILE)).read().strip() == "8"
    it_dir = os.path.join(ckdir, "iter_0000008")
    assert sorted(os.listdir(it_dir)) == ["manifest.json", "metadata.json", "mp_rank_00_000", "mp_rank_00_001",
                                          "mp_rank_01_000", "mp_rank_01_001"]
    shard = torch.load(os.path.join(it_dir, "mp_rank_01_001", "model_optim_rng.pt"), weights_only=True)
    for key in ("model", "optimizer", "opt_param_scheduler", "iteration", "consumed_samples", "data_loader",
                "rng_state", "args"):
        assert key in shard, key
    assert shard["iteration"] == 8 and shard["consumed_samples"] == 64 and len(shard["rng_state"]) == 2
    meta = json.load(open(os.path.join(it_dir, "metadata.json")))
    assert meta["parallel"]["tensor_model_parallel_size"] == 2 and meta["engine"] == "torch"
    assert meta["parallel"]["pipeline_model_parallel_size"] == 2


def test_mismatched_or_missing_load_is_refused(resumed, tmp_path):
    ckdir, _ = resumed
    before = sorted(os.listdir(ckdir))
    cases = [(make_cfg(tp=2, pp=2, hidden_size=128), "--hidden-size 64"),
             (make_cfg(tp=2, pp=2, num_layers=6), "--num-layers 4"),
             (make_cfg(tp=1, pp=2), "--tensor-model-parallel-size 2"),
             (make_cfg(tp=2, pp=1), "--pipeline-model-parallel-size 2"),
             (make_cfg(tp=2, pp=2, family="llama"), "--model-family gpt2")]
    for cfg, needle in cases:
        with pytest.raises(ConfigError, match=needle) as e:
            checkpoint_layout.resolve_load(with_checkpoint(cfg, load=ckdir, save=ckdir))
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        checkpoint_layout.resolve_load(with_checkpoint(make_cfg(), load=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="holds no latest_checkpointed_iteration.txt"):
        checkpoint_layout.resolve_load(with_checkpoint(make_cfg(), load=str(tmp_path)))
    # --load equal to --save with nothing saved yet: the auto-resume pattern starts fresh.
    assert checkpoint_layout.resolve_load(with_checkpoint(make_cfg(), load=str(tmp_path), save=str(tmp_path))) is None
    assert sorted(os.listdir(ckdir)) == before  # nothing written or removed


# --------------------------------------------------------------------------------- killed during a save
def _kill_during_second_save(rank, world, ckdir):
    cfg = with_checkpoint(make_cfg(), save=ckdir, save_interval=2)
    st = parallel_state(rank, world, cfg)
    calls = {"n": 0}
    real_save = checkpointing._save_file

    def save_then_die(obj, path):
        calls["n"] += 1
        if calls["n"] == 2 and rank == 0:  # half of the second checkpoint's shard, then SIGKILL
            with open(path + ".partial", "wb") as f:
                f.write(b"\x80\x02half a pickle")
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, path)

    checkpointing._save_file = save_then_die
    return run_plain(cfg, st)


def _resume_after_kill(rank, world, ckdir):
    cfg = with_checkpoint(make_cfg(iters=6), save=ckdir, load=ckdir, save_interval=2)
    return run_plain(cfg, parallel_state(rank, world, cfg))


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    ckdir = str(tmp_path)
    with pytest.raises(mp.ProcessExitedException):
        run_distributed(_kill_during_second_save, 2, ckdir)
    assert open(os.path.join(ckdir, checkpoint_layout.LATEST_FILE)).read().strip() == "2"
    assert os.path.isdir(os.path.join(ckdir, ".tmp.iter_0000004"))  # the interrupted save, never visible
    assert not os.path.exists(os.path.join(ckdir, "iter_0000004"))
    assert checkpoint_layout.resolve_load(with_checkpoint(make_cfg(), load=ckdir)) == (ckdir, 2)
    results = run_distributed(_resume_after_kill, 2, ckdir)
    assert [(r["start"], r["end"]) for r in results] == [(2, 6), (2, 6)]
    assert sorted(os.listdir(ckdir)) == ["iter_0000002", "iter_0000004", "iter_0000006",
                                         checkpoint_layout.LATEST_FILE]  # leftovers cleaned by the next save


def test_rng_state_round_trip():
    torch.manual_seed(3)
    random.seed(4)
    state = checkpointing.get_rng_state()
    expect = (torch.rand(2), random.random())
    torch.manual_seed(99)
    random.seed(98)
    checkpointing.set_rng_state(state)
    assert torch.equal(torch.rand(2), expect[0]) and random.random() == expect[1]


def test_trained_tp2_pp2_checkpoint_exports_to_transformers(resumed, tmp_path):
    """Merge the TP x PP shards of the trained run's last checkpoint: transformers gives our held-out loss."""
    transformers = pytest.importorskip("transformers")
    from tools import convert_checkpoint as tool
    from tests.engine_harness import held_out_dataset

    ckdir, results = resumed
    assert tool.main(["export-hf", "--load", ckdir, "--output", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    cfg = make_cfg()
    tokens = torch.stack([held_out_dataset(cfg)[i]["tokens"] for i in range(cfg.train.global_batch_size)])
    with torch.no_grad():
        logits = hf(tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(float(loss) - results[0]["second"]["val_loss"]) < 1e-5
    assert abs(float(loss) - results[0]["full"]["val_loss"]) < 1e-5
