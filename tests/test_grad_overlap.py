"""The overlapped data-parallel reduction (parallel/grad_overlap.py) gives the synchronous path's gradients bit for
bit at DP 2 (gloo), over micro-batch accumulation, skipped layers and sliced weights (direct and autograd
gradients), reduces them in place in its flat buffer (every gradient a view of it), and really launches buckets
during backward; counting micro-batches wrong (a bucket reduced before its last micro-batch) is caught."""
import torch

from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges
from megatron_est.est.schedule import Schedule, Stage
from megatron_est.model.language_model import LanguageModel
from megatron_est.parallel.grad_overlap import OverlappedGradReduce
from megatron_est.parallel.grads import sync_data_parallel_grads
from megatron_est.parallel.sliced_grad import set_direct_grads
from megatron_est.parallel.state import ParallelState, build_groups
from tests.helpers import run_distributed, tiny, token_batch

N_MICRO = 2


def _grads(model, plan, rank: int, it: int, before, after) -> dict:
    model.zero_grad(set_to_none=True)
    before()
    for mb in range(N_MICRO):
        ids, labels = token_batch(model.cfg, seed=100 * rank + 10 * it + mb)  # each rank its own data
        model(ids, labels, plan).mean().backward()
    after()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _in_buffer(g: torch.Tensor, reducer: OverlappedGradReduce) -> bool:
    """g is a view of the reducer's flat gradient buffer (reduced in place: no flattened copy, no copy back)."""
    return any(g.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
               for flat in reducer.buffer.flat.values())


def _worker(rank: int, world: int) -> dict:
    st = build_groups(ParallelState(world, rank, tp=1, pp=1, dp=world))
    cfg = tiny("llama", num_layers=4)
    sync, over = LanguageModel(cfg, st, seed=3), LanguageModel(cfg, st, seed=3)
    reducer = OverlappedGradReduce(list(over.parameters()), st.dp_group, st.dp, bucket_numel=4096)
    sched = Schedule((Stage(0, 0.5, 0.5, 0.5),))
    sampler = SubnetworkSampler(cfg, sched, 5, Strata(1, 1, even_ranges(cfg.num_layers, 1)))
    out = {}
    for it, sub in enumerate((None, sampler(1), sampler(2))):
        for direct in (True, False):
            set_direct_grads(over, direct)
            plan = sync.make_plan(sub)
            want = _grads(sync, plan, rank, it, lambda: None,
                          lambda: sync_data_parallel_grads(list(sync.parameters()), st.dp_group, st.dp))
            got = _grads(over, over.make_plan(sub), rank, it,
                         lambda: reducer.begin(over.skipped_parameters(plan), N_MICRO), reducer.finish)
            in_buffer = all(p.grad is None or _in_buffer(p.grad, reducer) for p in over.parameters())
            out[(it, direct)] = (want, got, reducer.launched_in_backward, in_buffer)
    plan = over.make_plan(sampler(3))
    miscounted = _grads(over, plan, rank, 3, lambda: reducer.begin(over.skipped_parameters(plan), 1),
                        reducer.finish)
    out["miscounted"] = (_grads(sync, plan, rank, 3, lambda: None,
                                lambda: sync_data_parallel_grads(list(sync.parameters()), st.dp_group, st.dp)),
                         miscounted)
    return out


def test_overlapped_reduction_equals_synchronous_dp2():
    for rank_out in run_distributed(_worker, 2):
        for key in [k for k in rank_out if k != "miscounted"]:
            want, got, launched, in_buffer = rank_out[key]
            assert launched > 1, key  # buckets went out during backward, not all at finish()
            assert in_buffer, key
            assert want.keys() == got.keys()
            for name, g in want.items():
                assert (g is None) == (got[name] is None), (key, name)
                assert g is None or torch.equal(g, got[name]), (key, name)
        want, got = rank_out["miscounted"]
        assert any(g is not None and not torch.equal(g, got[n]) for n, g in want.items())


def _engine_worker(rank, world):
    import dataclasses

    from tests.engine_harness import make_cfg, parallel_state, run_plain

    out = {}
    for overlap in (True, False):
        cfg = make_cfg()
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, overlap_grad_reduce=overlap))
        res = run_plain(cfg, parallel_state(rank, world, cfg))
        out[overlap] = (res["losses"], res["model"])
    return out


def test_overlap_grad_reduce_flag_trains_the_same_dp2():
    """--overlap-grad-reduce (the default) and --no-overlap-grad-reduce train bit for bit alike at DP 2 over an
    EST schedule crossing all stages (layers skipped, heads and neurons sliced)."""
    out = run_distributed(_engine_worker, 2)[0]
    (on_losses, on_model), (off_losses, off_model) = out[True], out[False]
    assert on_losses == off_losses
    assert all(torch.equal(on_model[k], off_model[k]) for k in on_model)
