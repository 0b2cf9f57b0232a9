"""3D parallelism equals one process: every (TP, PP, DP) layout trains the same EST run to the same losses and
weights, for GPT-2 (tied embedding split over the first and last stage) and Llama.

One spawn per world size runs every layout of that size, both families and all runs:
  run "strat":   stratified sampling; the schedule crosses EST stages 1, 2 and 3.
  run "unstrat": unstratified sampling with p_L = 0.25 (one layer of four kept), so every stage but one has all
                 its layers skipped in the first steps, then p_L = 0.5, then the full model.
  run "freeze":  "unstrat" with --est-unsampled-update freeze (the others use adamw, the default): a stage that
                 skipped every layer has no gradient at all (it used to raise in clipping and hang its peers).
  run "default": "strat"'s schedule with the default strata: the same flags must draw the same subnetworks in
                 every layout (until 2026-12-01 the default strata were the TP size and the pipeline stages, so
                 TP 2, PP 2 and the 1 + 3 split each trained a different run).
Forward hooks on the layers record which layers each stage really ran in each step.
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from megatron_est.config import Config, ESTConfig, ParallelConfig, TrainConfig
from megatron_est.parallel.partition import stage_ranges
from megatron_est.validation import validate
from megatron_est.est.balance import balancing_strata
from megatron_est.est.build import build_sampler
from megatron_est.est.flops import stage_step_flops, step_flops
from megatron_est.est.sampler import Subnetwork
from megatron_est.est.schedule import Stage
from megatron_est.model.build import build_model
from megatron_est.model.language_model import LanguageModel
from megatron_est.parallel.state import ParallelState, build_groups
from megatron_est.training.batches import MicroBatches, RandomTokens
from megatron_est.training.engine import TorchEngine
from megatron_est.training.loop import train
from megatron_est.training.metrics import MetricsLog
from megatron_est.training.optimizer import build_optimizer
from tests.helpers import run_distributed, tiny

FAMILIES = ("gpt2", "llama")
RUNS = {
    "strat": dict(schedule="0:0.5,0.5,0.5;2:0.5,0.5,1;4:1,1,1", stratified=True, tp_strata=2, pp_strata=2),
    "unstrat": dict(schedule="0:0.5,0.5,0.25;2:0.5,0.5,0.5;4:1,1,1", stratified=False),
}
RUNS["freeze"] = dict(RUNS["unstrat"], unsampled_update="freeze")
RUNS["default"] = dict(schedule=RUNS["strat"]["schedule"])
ITERS, GBS, MBS = 5, 4, 1
# (tp, pp, first-stage layers, last-stage layers, runs) per world size. The stratified run fixes its strata
# (--est-pp-strata 2), so they cross the stage boundaries of the uneven 1 + 3 split and of PP=4 and still
# draw what one process draws (until 2026-12-01 both were refused or drew per-stage strata).
LAYOUTS = {
    2: [(2, 1, None, None, ("strat", "unstrat", "default")), (1, 2, None, None, ("strat", "unstrat", "freeze",
                                                                               "default")),
        (1, 1, None, None, ("strat", "unstrat")), (1, 2, 1, 3, ("strat", "unstrat", "default"))],
    4: [(2, 2, None, None, ("strat", "unstrat", "freeze", "default")),
        (1, 4, None, None, ("strat", "unstrat", "freeze"))],
    8: [(2, 2, None, None, ("strat", "unstrat"))],
}


def _cfg(family: str, run: str, tp: int = 1, pp: int = 1, first=None, last=None) -> Config:
    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         decoder_first_pipeline_num_layers=first, decoder_last_pipeline_num_layers=last)
    # adam_eps 1e-4, not 1e-8: AdamW turns a gradient element of ~1e-8 (here there are some, from cancellation)
    # into a step of up to lr whose size hangs on its rounding noise, which differs between layouts. A larger
    # eps keeps such steps proportional to the gradient; a real layout bug still moves weights by ~lr.
    tr = TrainConfig(micro_batch_size=MBS, global_batch_size=GBS, train_iters=ITERS, lr=3e-3, lr_warmup_iters=2,
                     adam_eps=1e-4, log_interval=1, eval_interval=ITERS, eval_iters=1, seed=4)
    est = ESTConfig(**{"unsampled_update": "adamw", **RUNS[run]})
    return Config(model=tiny(family, num_layers=4), parallel=par, est=est, train=tr)


def _record_layers(model) -> list[list[int]]:
    """Per optimizer step, the global indices of the layers this rank ran (forward hooks)."""
    steps: list[list[int]] = [[]]
    for offset, layer in enumerate(model.decoder.layers):
        layer.register_forward_hook(lambda *_, i=model.decoder.first + offset: steps[-1].append(i))
    return steps


def _train_one(cfg: Config, st: ParallelState) -> dict:
    validate(cfg, st.world_size)
    model = build_model(cfg, st)
    ran = _record_layers(model)
    opt = build_optimizer(model, cfg.train)
    opt.register_step_post_hook(lambda *_: ran.append([]))
    data = RandomTokens(cfg.model.vocab_size, cfg.model.seq_length, n=64, seed=2)
    valid = RandomTokens(cfg.model.vocab_size, cfg.model.seq_length, n=16, seed=3)
    state = train(cfg, st, TorchEngine(cfg, st, model, opt), build_sampler(cfg),
                  MicroBatches(data, GBS, MBS, st.dp, st.dp_rank),
                  MicroBatches(valid, GBS, MBS, st.dp, st.dp_rank), log=MetricsLog(None, enabled=False))
    params = {n: (p.detach().clone(), getattr(p, "partition_dim", None), getattr(p, "pipeline_duplicate", False))
              for n, p in model.global_named_parameters()}
    return {"losses": [r["lm_loss"] for r in state.history if "lm_loss" in r],
            "norms": [r["grad_norm"] for r in state.history if "lm_loss" in r],
            "val": [r["val_loss"] for r in state.history if "val_loss" in r],
            "ran": [sorted(set(s)) for s in ran[:ITERS]], "params": params,
            "coords": (st.tp_rank, st.pp_rank, st.dp_rank)}


def _run_layouts(st_of, layouts) -> dict:
    out = {}
    for tp, pp, first, last, runs in layouts:
        st = st_of(tp, pp)
        for family in FAMILIES:
            for run in runs:
                out[(tp, pp, first, last, family, run)] = _train_one(_cfg(family, run, tp, pp, first, last), st)
    return out


def _worker(rank: int, world: int) -> dict:
    return _run_layouts(lambda tp, pp: build_groups(ParallelState(world, rank, tp, pp, world // (tp * pp))),
                        LAYOUTS[world])


def _assemble(rank_results: list[dict]) -> dict[str, torch.Tensor]:
    """Full (unsharded, unpipelined) weights of DP replica 0; checks the other replicas and the tied copy."""
    shards: dict[str, dict[int, torch.Tensor]] = {}
    replicas: dict[tuple, dict] = {}
    for res in rank_results:
        tp_rank, pp_rank, dp_rank = res["coords"]
        for name, (w, dim, duplicate) in res["params"].items():
            replicas.setdefault((name, tp_rank, pp_rank, duplicate), []).append(w)
            if dp_rank == 0 and not duplicate:
                shards.setdefault(name, {})[tp_rank] = (w, dim)
    for (name, *_), copies in replicas.items():  # every DP replica holds the same weights
        for w in copies[1:]:
            torch.testing.assert_close(w, copies[0], rtol=0, atol=0, msg=name)
    full = {}
    for name, by_tp in shards.items():
        parts = [by_tp[t] for t in sorted(by_tp)]
        dim = parts[0][1]
        full[name] = parts[0][0] if dim is None or len(parts) == 1 else torch.cat([p for p, _ in parts], dim)
    for (name, tp_rank, _, duplicate), copies in replicas.items():  # last stage's tied copy == first stage's
        if duplicate:
            first = next(r for r in rank_results if r["coords"] == (tp_rank, 0, 0))["params"][name][0]
            torch.testing.assert_close(copies[0], first, rtol=0, atol=0, msg="tied embedding copy")
    return full


@pytest.fixture(scope="module")
def reference() -> dict:
    """(TP, PP, DP) = (1, 1, 1) in this process."""
    out = {}
    for family in FAMILIES:
        for run in RUNS:
            out[(family, run)] = _train_one(_cfg(family, run), ParallelState())
    return out


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def world_results(request) -> tuple[int, list[dict]]:
    return request.param, run_distributed(_worker, request.param)


def _compare(ref: dict, rank_results: list[dict], cfg: Config) -> None:
    for res in rank_results:
        assert res["losses"] == pytest.approx(ref["losses"], rel=2e-5)
        assert res["norms"] == pytest.approx(ref["norms"], rel=1e-4)
        assert res["val"] == pytest.approx(ref["val"], rel=2e-5)
    full = _assemble(rank_results)
    ref_params = {n: w for n, (w, _, _) in ref["params"].items()}
    assert set(full) == set(ref_params)
    for name, w in ref_params.items():
        torch.testing.assert_close(full[name], w, rtol=1e-5, atol=1e-6, msg=name)
    # Each stage ran exactly the sampled layers that it owns, every step.
    sampler = build_sampler(cfg)
    for res in rank_results:
        lo, hi = stage_ranges(cfg)[res["coords"][1]]
        assert res["ran"] == [[i for i in sampler(it).layers if lo <= i < hi] for it in range(ITERS)]


def test_layouts_equal_single_process(world_results, reference):
    world, results = world_results
    for tp, pp, first, last, runs in LAYOUTS[world]:
        for family in FAMILIES:
            for run in runs:
                key = (tp, pp, first, last, family, run)
                cfg = _cfg(family, run, tp, pp, first, last)
                _compare(reference[(family, run)], [r[key] for r in results], cfg)


def test_runs_cover_skipped_stages_and_all_est_stages(reference):
    """The comparison above is meaningful: the reference losses fall, the schedule reaches the full model, and
    the unstratified run has steps in which a whole pipeline stage (of two) ran no layer."""
    for family in FAMILIES:
        for run in RUNS:
            ref = reference[(family, run)]
            assert ref["losses"][-1] < ref["losses"][0]
            assert ref["ran"][0] != list(range(4)) and ref["ran"][-1] == list(range(4))
        cfg = _cfg(family, "unstrat", pp=2)
        sampler = build_sampler(cfg)
        assert any(all(i < 2 for i in sampler(it).layers) or all(i >= 2 for i in sampler(it).layers)
                   for it in range(ITERS))


def test_layouts_differ_when_they_should(world_results, reference):
    """The comparison can fail: the stratified and unstratified runs give different losses."""
    assert reference[("gpt2", "strat")]["losses"] != pytest.approx(reference[("gpt2", "unstrat")]["losses"],
                                                                   rel=1e-3)
    ref_freeze, ref_adamw = reference[("gpt2", "freeze")]["params"], reference[("gpt2", "unstrat")]["params"]
    assert any(not torch.equal(ref_freeze[n][0], ref_adamw[n][0]) for n in ref_freeze)


@pytest.mark.parametrize("pp,first,last", [(2, None, None), (4, None, None), (3, 2, 2)])
def test_stratified_kept_layers_per_stage(pp, first, last):
    """Strata that line up with the stages (est/balance.balancing_strata: 2, 4 and 4 strata of 8 layers here)
    keep round(p_L x its layer count) on every stage at every step; one stratum (the default) does not, which
    this check would notice."""
    counts = {}
    for strata in ("aligned", 1):
        cfg = _cfg("gpt2", "strat", pp=pp, first=first, last=last)
        cfg.model.num_layers, cfg.est.schedule = 8, "0:1,1,0.5"
        cfg.est.pp_strata = balancing_strata(cfg)[1] if strata == "aligned" else 1
        stages, sampler = stage_ranges(cfg), build_sampler(cfg)
        counts[strata] = [[sum(lo <= i < hi for i in sampler(it).layers) for lo, hi in stages]
                          for it in range(100)]
    assert balancing_strata(cfg)[1] == {2: 2, 4: 4, 3: 4}[pp]
    expect = [max(1, int(0.5 * (hi - lo) + 0.5)) for lo, hi in stages]
    assert all(c == expect for c in counts["aligned"])
    assert any(c != expect for c in counts[1])
    if first is None:
        assert len(set(expect)) == 1


def test_stage_flops_add_up_to_step_flops():
    cfg = _cfg("llama", "strat", pp=2, first=1, last=3)
    sub = build_sampler(cfg)(0)
    stages = stage_ranges(cfg)
    parts = [stage_step_flops(cfg.model, 128, sub, r, with_head=i == len(stages) - 1) for i, r in enumerate(stages)]
    assert sum(parts) == step_flops(cfg.model, 128, sub) and 0 < parts[0] < parts[1]


def _shard_skipping_sub(cfg):
    """Layer 0 keeps heads of TP shard 0 only, layer 1 neurons of shard 1 only (possible when unstratified)."""
    f = cfg.ffn_hidden_size
    heads = (torch.tensor([0, 2]), torch.arange(8), torch.arange(8), torch.arange(8))
    neurons = (torch.arange(f), torch.arange(f // 2, f, 3), torch.arange(f), torch.arange(f))
    return Subnetwork(0, Stage(0, 0.5, 0.5, 1.0), (0, 1, 2, 3), heads, neurons, 1.0)


def _shard_skip_loss_and_grads(st: ParallelState) -> dict:
    out = {}
    for family in FAMILIES:
        cfg = tiny(family, num_layers=4)
        model = LanguageModel(cfg, st, seed=8)
        ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=torch.Generator().manual_seed(1))
        loss = model(ids[:, :-1], ids[:, 1:], model.make_plan(_shard_skipping_sub(cfg))).mean()
        loss.backward()
        out[family] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return out


def _shard_skip_worker(rank: int, world: int) -> dict:
    # A short timeout turns a collective that one shard skips (a hang) into an error.
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=30))
    return _shard_skip_loss_and_grads(ParallelState(world, rank, tp=2, tp_group=group))


def test_tp_shard_without_heads_or_neurons_joins_every_collective():
    """A TP shard that kept no head (or no neuron) of a layer must still run the backward all-reduce of its
    column-parallel input, or the shards' collectives fall out of step (seen as a hang in the benchmark)."""
    ref = _shard_skip_loss_and_grads(ParallelState())
    for rank, res in enumerate(run_distributed(_shard_skip_worker, 2)):
        for family in FAMILIES:
            loss, grads = res[family]
            torch.testing.assert_close(loss, ref[family][0], rtol=1e-5, atol=1e-6)
            for name in ("decoder.layers.0.input_norm.weight", "decoder.layers.1.post_attention_norm.weight"):
                torch.testing.assert_close(grads[name], ref[family][1][name], rtol=1e-4, atol=1e-6, msg=name)
