"""Pipeline exchanges under NCCL's point-to-point semantics, on CPU (tests/nccl_p2p.py: a send completes only once
its receive runs; a rank's operations run in issue order; one batch_isend_irecv progresses together).

The real 1F1B schedule (training.pipeline_schedule) is replayed with a tiny model for PP 2 and PP 4, 4 micro-batches
per step, an EST schedule in which single-layer middle stages skip all their layers in some steps:
- negative control: the exchange before the fix (a separate isend, then irecv; UngroupedP2P below) deadlocks on
  every rank in the steady phase;
- parallel/p2p.py's grouped exchange completes, and a few training steps equal one process;
- negative control of StageP2P's group join: without it, a batch_isend_irecv is its group's first collective.
One spawn per pipeline size runs all three, each on its own process groups and store keys.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import traceback
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from megatron_est.config import Config
from megatron_est.parallel.partition import stage_ranges
from megatron_est.est.build import build_sampler
from megatron_est.parallel import p2p
from megatron_est.parallel.p2p import StageP2P
from megatron_est.parallel.state import ParallelState
from megatron_est.training import pipeline_schedule
from megatron_est.training.batches import MicroBatches
from tests.engine_harness import build_model, dataset, make_cfg, parallel_state, run_plain
from tests.helpers import free_port, run_distributed
from tests.nccl_p2p import Deadlock, FirstCollective, nccl_semantics

# Legitimate waits here take milliseconds; the negative control pays NEG_TIMEOUT_S once, when it deadlocks.
NEG_TIMEOUT_S, TIMEOUT_S = 4.0, 60.0
FAMILY = {2: "llama", 4: "gpt2"}  # pipeline size -> model
ITERS = 4  # EST stage 1 (layers sampled) for 3 steps, then stage 2
STEADY = {"send_forward_recv_backward", "send_backward_recv_forward"}


def _cfg(pp: int, layout_pp: int) -> Config:
    """4 layers, 8 samples per step in micro-batches of 2 (4 micro-batches); layout_pp stages."""
    cfg = make_cfg(FAMILY[pp], pp=layout_pp, iters=ITERS)
    # adam_eps 1e-4 as in tests/test_pipeline.py: keeps tiny gradient elements from amplifying rounding noise.
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, adam_eps=1e-4))


class UngroupedP2P(StageP2P):
    """Negative control: parallel/p2p.py's exchange before the fix, copied: an isend, then an irecv."""

    def _exchange(self, send, send_to, recv_from):
        works, received = [], None
        if send is not None and send_to is not None:
            works.append(dist.isend(send.detach().contiguous(), dst=send_to, group=self.group))
        if recv_from is not None:
            received = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            works.append(dist.irecv(received, src=recv_from, group=self.group))
        for w in works:
            w.wait()
        return received


def _first_collective(fn) -> str:
    """FirstCollective's message, or "" if fn() did not raise it."""
    try:
        fn()
    except FirstCollective as e:
        return str(e)
    return ""


def _outcome(fn) -> dict:
    """fn()'s result, or where it deadlocked: the message and the functions on the stack."""
    try:
        return {"result": fn(), "deadlock": None}
    except Deadlock as e:
        return {"result": None, "deadlock": str(e), "stack": {f.name for f in traceback.extract_tb(e.__traceback__)}}


def _step_zero(cfg: Config, st: ParallelState):
    """Step 0's forward and backward passes through the pipeline, as a function of no arguments."""
    model = build_model(cfg, st)
    batches = MicroBatches(dataset(cfg), cfg.train.global_batch_size, cfg.train.micro_batch_size, st.dp, st.dp_rank)
    plan = model.make_plan(build_sampler(cfg)(0), st.device)
    return lambda: pipeline_schedule.forward_backward(model, batches, 0, plan, st)


def _old_exchange_step(cfg: Config, st: ParallelState, store: dist.Store) -> dict:
    """Step 0 with the ungrouped exchange."""
    step = _step_zero(cfg, st)
    dist.barrier()  # start together: a rank still building its model must not look like a deadlock
    with nccl_semantics(store, NEG_TIMEOUT_S), mock.patch.object(pipeline_schedule, "StageP2P", UngroupedP2P):
        return _outcome(step)


def _unjoined_step(cfg: Config, st: ParallelState, store: dist.Store) -> str:
    """Negative control of the group join: step 0 without it."""
    step = _step_zero(cfg, st)
    with nccl_semantics(store, NEG_TIMEOUT_S), mock.patch.object(p2p, "_join_group_once", lambda *_: None):
        return _first_collective(step)


def _train(cfg: Config, st: ParallelState) -> dict:
    """run_plain's losses, gradient norms and validation loss, and the trained weights by global name."""
    models = []
    res = run_plain(cfg, st, hooks=lambda model, **_: models.append(model))
    return {"losses": res["losses"], "norms": [r["grad_norm"] for r in res["records"]], "val": res["val_loss"],
            "weights": {n: p.detach().clone() for n, p in models[0].global_named_parameters()}}


def _grouped_run(cfg: Config, st: ParallelState, store: dist.Store) -> dict:
    with nccl_semantics(store, TIMEOUT_S) as stream:
        out = _outcome(lambda: _train(cfg, st))
    return {**out, "batches": stream.sizes()}


def _transport_checks(rank: int, store: dist.Store) -> dict:
    """Ranks 0 and 1: what the transport lets complete."""
    out, peer, mine = {}, 1 - rank, torch.full((3,), float(rank))

    def exchange(kind: str):
        got = torch.empty(3)
        if kind == "lone":  # rank 0 only: rank 1 posts no receive
            works = [dist.isend(mine, peer)]
        elif kind == "grouped":
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, mine, peer), dist.P2POp(dist.irecv, got, peer)])
        elif kind == "ordered" and rank == 1:  # rank 0 sends first and rank 1 receives first: they pair up
            works = [dist.irecv(got, peer), dist.isend(mine, peer)]
        else:  # "ungrouped" (both ranks) and "ordered" (rank 0): send first
            works = [dist.isend(mine, peer), dist.irecv(got, peer)]
        for w in works:
            w.wait()
        return got

    for kind in ("lone", "ungrouped", "ordered", "grouped"):
        with nccl_semantics(dist.PrefixStore(f"{kind}/", store), 2.0):
            dist.barrier()  # a collective on the group before its first batch_isend_irecv (NCCL's rule)
            if kind != "lone" or rank == 0:
                out[kind] = _outcome(lambda: exchange(kind))
    with nccl_semantics(dist.PrefixStore("first/", store), 2.0):  # no collective on this group yet
        out["first"] = _first_collective(lambda: exchange("grouped"))
    return out


def _worker(rank: int, world: int, port: int) -> dict:
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, datetime.timedelta(seconds=120))
    out = {}
    if world == 2:
        out["transport"] = _transport_checks(rank, store)
    cfg = _cfg(world, world)
    # Each run builds its own groups and uses its own store keys: nothing of the deadlocked run carries over.
    out["old"] = _old_exchange_step(cfg, parallel_state(rank, world, cfg), dist.PrefixStore("old/", store))
    out["unjoined"] = _unjoined_step(cfg, parallel_state(rank, world, cfg), dist.PrefixStore("unjoined/", store))
    out["new"] = _grouped_run(cfg, parallel_state(rank, world, cfg), dist.PrefixStore("new/", store))
    dist.barrier()  # rank 0 serves the store: keep it up until every rank is done with it
    return out


@functools.lru_cache(maxsize=None)
def _spawn(pp: int) -> list[dict]:
    return run_distributed(_worker, pp, free_port())


@functools.lru_cache(maxsize=None)
def _reference(pp: int) -> dict:
    return _train(_cfg(pp, 1), ParallelState())


def test_transport_has_nccl_semantics():
    """A lone send never completes, neither do two sends that each wait for the other's later receive; a send
    that meets a receive, and a grouped send + receive, complete with the right data; a batch_isend_irecv as the
    group's first collective is refused."""
    res = [r["transport"] for r in _spawn(2)]
    assert "send to rank 1" in res[0]["lone"]["deadlock"]
    for rank, r in enumerate(res):
        assert f"rank {rank}: batch_isend_irecv is the first collective" in r["first"]
        assert f"rank {rank}: send to rank {1 - rank}" in r["ungrouped"]["deadlock"]
        for kind in ("ordered", "grouped"):
            assert r[kind]["deadlock"] is None
            assert torch.equal(r[kind]["result"], torch.full((3,), float(1 - rank))), kind


@pytest.mark.parametrize("pp", [2, 4])
def test_ungrouped_exchange_deadlocks_in_1f1b(pp):
    """Negative control: every rank is stuck in a send of a steady-state exchange."""
    for rank, r in enumerate(_spawn(pp)):
        old = r["old"]
        assert old["deadlock"] is not None, f"rank {rank} finished the step"
        assert f"rank {rank}: send to" in old["deadlock"] and old["stack"] & STEADY, old


@pytest.mark.parametrize("pp", [2, 4])
def test_every_rank_joins_the_group_before_its_first_exchange(pp):
    """Negative control of StageP2P's join: without it, each rank's first exchange is the group's first
    collective (the replay with the join, below, passes the same check)."""
    for rank, r in enumerate(_spawn(pp)):
        assert f"rank {rank}: batch_isend_irecv is the first collective" in r["unjoined"]


@pytest.mark.parametrize("pp", [2, 4])
def test_grouped_exchange_completes_and_equals_one_process(pp):
    ref = _reference(pp)
    for rank, r in enumerate(_spawn(pp)):
        new = r["new"]
        assert new["deadlock"] is None, new["deadlock"]
        got = new["result"]
        assert got["losses"] == pytest.approx(ref["losses"], rel=2e-5)
        assert got["norms"] == pytest.approx(ref["norms"], rel=1e-4)
        assert got["val"] == pytest.approx(ref["val"], rel=2e-5)
        for name, w in got["weights"].items():
            torch.testing.assert_close(w, ref["weights"][name], rtol=1e-5, atol=1e-6, msg=name)
        # The schedule really ran through the transport, with send + receive groups in the steady phase.
        # The schedule really ran through the transport: 4 micro-batches a step to each neighbour, and groups of
        # one send and one receive (the steady phase).
        sends = sum(s for s, _ in new["batches"])
        assert (1, 1) in new["batches"] and sends >= ITERS * 4 * ((rank > 0) + (rank < pp - 1))


def test_replay_has_a_middle_stage_that_skips_all_its_layers():
    cfg = _cfg(4, 4)
    sampler, middle = build_sampler(cfg), stage_ranges(cfg)[1:3]
    assert any(not any(lo <= i < hi for i in sampler(it).layers) for it in range(ITERS) for lo, hi in middle)


def test_send_of_the_wrong_shape_or_dtype_is_refused():
    p2p = StageP2P(ParallelState(), (2, 4, 8), torch.float32)
    for bad in (torch.zeros(2, 4, 9), torch.zeros(2, 4, 8, dtype=torch.bfloat16)):
        with pytest.raises(RuntimeError, match=r"pipeline send to rank 1: tensor .* but the receiving stage allocates "
                                               r"\(2, 4, 8\) torch.float32"):
            p2p._exchange(bad, 1, None)
