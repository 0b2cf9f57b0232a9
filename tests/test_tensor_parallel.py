"""TP=2 over gloo gives the loss and (gathered) gradients of a single-process TP=1 run."""
import pytest
import torch
import torch.distributed as dist

from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges
from megatron_est.est.schedule import Schedule, Stage
from megatron_est.model.language_model import LanguageModel
from megatron_est.parallel.state import ParallelState, build_groups
from tests.helpers import run_distributed, tiny, token_batch

FAMILIES = ("gpt2", "llama")
RATES = (None, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))  # full model, stage-1-like, stage-2-like


def _sub(cfg, rates):
    if rates is None:
        return None
    strata = Strata(2, 2, even_ranges(cfg.num_layers, 1))  # same strata at TP=1 and TP=2: same subnetwork
    return SubnetworkSampler(cfg, Schedule((Stage(0, *rates),)), 3, strata)(7)


def _full_grads(model: LanguageModel, st: ParallelState) -> dict:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dim = getattr(p, "partition_dim", None)
        if dim is not None and st.tp > 1:
            parts = [torch.empty_like(g) for _ in range(st.tp)]
            dist.all_gather(parts, g.contiguous(), group=st.tp_group)
            g = torch.cat(parts, dim=dim)
        out[name] = g
    return out


def _run_all(st: ParallelState) -> dict:
    results = {}
    for family in FAMILIES:
        cfg = tiny(family, num_layers=4)
        model = LanguageModel(cfg, st, seed=21)
        ids, labels = token_batch(cfg, batch=2, seed=1)
        for rates in RATES:
            model.zero_grad(set_to_none=True)
            loss = model(ids, labels, model.make_plan(_sub(cfg, rates))).mean()
            loss.backward()
            results[(family, rates)] = (loss.detach(), _full_grads(model, st))
        with torch.no_grad():
            results[(family, "logits")] = model(ids)
    return results


def _worker(rank, world):
    st = build_groups(ParallelState(world, rank, tp=world, pp=1, dp=1))
    return _run_all(st)


@pytest.fixture(scope="module")
def tp_results():
    return run_distributed(_worker, 2)


@pytest.fixture(scope="module")
def reference():
    return _run_all(ParallelState())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rates", RATES)
def test_tp2_matches_tp1(tp_results, reference, family, rates):
    ref_loss, ref_grads = reference[(family, rates)]
    for rank_result in tp_results:
        loss, grads = rank_result[(family, rates)]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert set(grads) == set(ref_grads)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_logits_gathered(tp_results, reference, family):
    for rank_result in tp_results:
        torch.testing.assert_close(rank_result[(family, "logits")], reference[(family, "logits")],
                                   rtol=1e-4, atol=1e-5)


def test_tp2_starts_from_tp1_weights():
    """Weight init does not depend on the TP size: shard r of TP=2 is exactly rows/cols r of TP=1."""
    cfg = tiny("llama")
    full = dict(LanguageModel(cfg, seed=9).named_parameters())
    for rank in range(2):
        st = ParallelState(world_size=2, rank=rank, tp=2)
        for name, p in LanguageModel(cfg, st, seed=9).named_parameters():
            dim = getattr(p, "partition_dim", None)
            expect = full[name] if dim is None else full[name].chunk(2, dim=dim)[rank]
            assert torch.equal(p, expect), name
