"""One EST algorithm under every engine: --est-unsampled-update freeze and adamw (the default) give the loss curve
of one plain-torch process under DeepSpeed ZeRO 0/1/2/3 at DP 2 (ZeRO-3 with optimizer offload too) and ZeRO-1 at
PP 2 x DP 2, over an EST schedule that crosses all three stages (fixed strata: every layout draws the same
subnetworks). The plain engine's layouts (TP, PP, DP) are compared in tests/test_pipeline.py.

Negative control: ZeRO-3 with freeze switched off inside DeepSpeed (the frozen elements not written back) drifts
away from the plain engine's freeze curve: the check can fail.
"""
import pytest

from megatron_est.parallel.state import ParallelState
from tests.engine_harness import make_cfg, parallel_state, run_deepspeed, run_plain, with_checkpoint
from tests.helpers import run_distributed

pytest.importorskip("deepspeed")
MODES = ("freeze", "adamw")


def _ds(mode: str, **engine):
    return make_cfg(unsampled=mode, engine={"deepspeed": True, **engine})


def _dp2_worker(rank, world, ckdir):
    import megatron_est.training.deepspeed_unsampled as dsu

    cfg = make_cfg()
    st = parallel_state(rank, world, cfg)
    out = {}
    for mode in MODES:
        for stage in (0, 1, 2, 3):
            out[(mode, f"zero{stage}")] = run_deepspeed(_ds(mode, zero_stage=stage), st)["losses"]
    # Resume under freeze (ZeRO-3): stop after iteration 4, resume to 8, in DeepSpeed's checkpoint format.
    z3 = _ds("freeze", zero_stage=3)
    out["first"] = run_deepspeed(with_checkpoint(z3, save=ckdir, exit_interval=4), st)["losses"]
    out["second"] = run_deepspeed(with_checkpoint(z3, save=ckdir, load=ckdir), st)["losses"]
    out[("freeze", "zero3_offload")] = run_deepspeed(_ds("freeze", zero_stage=3, offload_optimizer=True),
                                                     st)["losses"]
    restore = dsu.DeepSpeedFreeze._restore
    dsu.DeepSpeedFreeze._restore = lambda self, *_: None  # negative control: nothing written back
    try:
        out[("freeze", "zero3_not_restored")] = run_deepspeed(_ds("freeze", zero_stage=3), st)["losses"]
    finally:
        dsu.DeepSpeedFreeze._restore = restore
    return out


def _pp2_dp2_worker(rank, world):
    cfg = make_cfg(pp=2, unsampled="freeze", engine={"deepspeed": True, "zero_stage": 1})
    return {("freeze", "zero1_pp2"): run_deepspeed(cfg, parallel_state(rank, world, cfg))["losses"]}


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, plain torch engine."""
    return {mode: run_plain(make_cfg(unsampled=mode), ParallelState())["losses"] for mode in MODES}


@pytest.fixture(scope="module")
def dp2(tmp_path_factory) -> list[dict]:
    return run_distributed(_dp2_worker, 2, str(tmp_path_factory.mktemp("z3_freeze")))


def _close(got: dict, ref: dict) -> bool:
    return all(abs(got[it] - ref[it]) <= 1e-5 * abs(ref[it]) for it in ref)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_dp2_equals_one_process(dp2, reference, mode, stage):
    for rank_out in dp2:
        assert _close(rank_out[(mode, f"zero{stage}")], reference[mode]), (mode, stage)


def test_zero3_freeze_resumes_bitwise(dp2):
    for rank_out in dp2:
        full = rank_out[("freeze", "zero3")]
        assert sorted(rank_out["first"]) == [1, 2, 3, 4] and sorted(rank_out["second"]) == [5, 6, 7, 8]
        assert {**rank_out["first"], **rank_out["second"]} == full  # bitwise, every iteration


def test_zero3_offload_freeze_equals_one_process(dp2, reference):
    for rank_out in dp2:
        assert _close(rank_out[("freeze", "zero3_offload")], reference["freeze"])


def test_freeze_and_adamw_differ_and_the_restore_matters(dp2, reference):
    """The comparisons can fail: the two modes train differently, and so does ZeRO without the write-back."""
    assert not _close(reference["adamw"], reference["freeze"])
    assert not _close(dp2[0][("freeze", "zero3_not_restored")], reference["freeze"])


@pytest.mark.slow
def test_zero1_pp2_dp2_freeze_equals_one_process(reference):
    for rank_out in run_distributed(_pp2_dp2_worker, 4):
        assert _close(rank_out[("freeze", "zero1_pp2")], reference["freeze"])


@pytest.mark.parametrize("shape,dim", [((12, 5), 0), ((12, 5), 1), ((7,), 0)])
def test_flat_positions_equal_the_mask(shape, dim):
    """ZeRO keeps a parameter as a flat region cut anywhere (mid-row too): the frozen positions found from the
    frozen rows/columns equal those of the whole-parameter mask (Frozen.mask, the definition), region by region,
    including one that runs into ZeRO-3's padding."""
    import torch

    from megatron_est.est.unsampled import Frozen
    from megatron_est.training.deepspeed_unsampled import _flat

    p = torch.nn.Parameter(torch.zeros(shape))
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        index = torch.randperm(shape[dim], generator=g)[: 1 + trial % shape[dim]].sort().values
        for frozen in (Frozen(dim, index), Frozen(0, None)):
            total = p.numel()
            start = int(torch.randint(0, total, (1,), generator=g))
            numel = int(torch.randint(1, total + 4, (1,), generator=g))  # may run past the end (padding)
            want = frozen.mask(p.shape).reshape(-1)[start:start + numel].nonzero().squeeze(1)
            got = _flat(p, frozen, start, numel)
            got = torch.arange(min(numel, total - start)) if got.index is None else got.index
            assert torch.equal(got, want), (frozen, start, numel)
