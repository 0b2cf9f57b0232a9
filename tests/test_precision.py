"""Mixed precision (bf16, fp16 with dynamic loss scaling) in the plain engine, evaluation under the run's
autocast, activation recompute of the sampled subnetwork, and apex against torch-native kernels where apex
exists."""
import dataclasses

import pytest
import torch

from megatron_est import kernels
from megatron_est.est.build import build_sampler
from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges
from megatron_est.est.schedule import Schedule, Stage
from megatron_est.model.language_model import LanguageModel
from megatron_est.model.recompute import configure_recompute
from megatron_est.parallel.state import ParallelState
from megatron_est.training.batches import MicroBatches
from megatron_est.training.engine import TorchEngine
from megatron_est.training.evaluate import evaluate
from megatron_est.training.loop import train
from megatron_est.training.metrics import MetricsLog
from megatron_est.training.precision import DynamicLossScaler
from tests.engine_harness import build_model, dataset, held_out_dataset, make_cfg, run_plain, with_checkpoint
from tests.helpers import tiny, token_batch


def _loss_grads_saved(model, ids, labels, plan):
    """Loss, gradients, bytes saved for backward, and how often each layer's forward ran."""
    calls = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
             for i, layer in enumerate(model.decoder.layers)]
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels, plan).mean()
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    return loss.detach(), grads, saved[0], calls


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_recompute_reruns_exactly_the_sampled_subnetwork(family):
    cfg = tiny(family, num_layers=4, seq_length=64)
    model = LanguageModel(cfg, seed=2)
    sub = SubnetworkSampler(cfg, Schedule((Stage(0, 0.5, 0.5, 0.5),)), 1, Strata(1, 1, even_ranges(4, 1)))(3)
    plan = model.make_plan(sub)
    ids, labels = token_batch(cfg, batch=2)
    ref_loss, ref_grads, ref_saved, ref_calls = _loss_grads_saved(model, ids, labels, plan)
    kept = set(sub.layers)
    assert ref_calls == {i: 1 for i in kept}
    results = {}
    for granularity in ("selective", "full"):
        configure_recompute(model, granularity)
        loss, grads, saved, calls = _loss_grads_saved(model, ids, labels, plan)
        assert torch.equal(loss, ref_loss)
        for name, g in ref_grads.items():  # same subnetwork recomputed: identical gradients, None where skipped
            assert (g is None) == (grads[name] is None), name
            if g is not None:
                assert torch.equal(grads[name], g), (granularity, name)
        results[granularity] = (saved, calls)
    configure_recompute(model, None)
    assert results["selective"][1] == ref_calls  # core attention only: layers run once
    assert results["full"][1] == {i: 2 for i in kept}  # kept layers run again in backward; skipped ones never
    assert results["full"][0] < results["selective"][0] < ref_saved


def test_bf16_trains_close_to_fp32_with_fp32_master_weights():
    fp32 = run_plain(make_cfg(), ParallelState())
    bf16 = run_plain(make_cfg(engine={"bf16": True, "recompute_granularity": "full"}), ParallelState())
    for it in range(1, 9):
        assert abs(bf16["losses"][it] - fp32["losses"][it]) < 0.05, it
    assert all(v.dtype == torch.float32 for v in bf16["model"].values())
    assert "loss_scale" not in bf16["records"][-1]


def test_fp16_dynamic_loss_scaling_skips_overflowing_steps_and_resumes(tmp_path):
    # A scale so large that every step overflows: all skipped, counted and logged; weights untouched.
    over_cfg = make_cfg(iters=3, engine={"fp16": True, "initial_loss_scale": 2.0 ** 60, "hysteresis": 1})
    over = run_plain(over_cfg, ParallelState())
    assert [(r["skipped_iterations"], r["loss_scale"]) for r in over["records"]] == \
        [(1, 2.0 ** 59), (2, 2.0 ** 58), (3, 2.0 ** 57)]
    initial = LanguageModel(over_cfg.model, seed=over_cfg.train.seed).state_dict()
    for name, w in over["model"].items():
        assert torch.equal(w, initial[name]), name  # skipped steps leave the fp32 weights as they were
    # A workable scale: no step skipped, the window doubles the scale, losses follow fp32 closely.
    ok_cfg = make_cfg(engine={"fp16": True, "initial_loss_scale": 2.0 ** 10, "loss_scale_window": 3})
    ok = run_plain(ok_cfg, ParallelState())
    fp32 = run_plain(make_cfg(), ParallelState())
    assert ok["records"][-1]["skipped_iterations"] == 0 and ok["records"][-1]["loss_scale"] == 2.0 ** 12
    for it in range(1, 9):
        assert abs(ok["losses"][it] - fp32["losses"][it]) < 0.02, it
    # The scaler's state is part of the checkpoint: a resumed run continues the identical fp16 curve.
    ckdir = str(tmp_path / "ck")
    first = run_plain(with_checkpoint(ok_cfg, save=ckdir, exit_interval=4), ParallelState())
    second = run_plain(with_checkpoint(ok_cfg, save=ckdir, load=ckdir), ParallelState())
    assert first["end"] == 4 and second["start"] == 4
    assert [second["losses"][i] for i in range(5, 9)] == [ok["losses"][i] for i in range(5, 9)]
    assert second["records"][-1]["loss_scale"] == ok["records"][-1]["loss_scale"]


def test_bf16_run_evaluates_under_autocast():
    """The validation loss a bf16 run logs is the model's loss under bf16 autocast, not its fp32 loss (GQA model:
    on GPU, fp32 q/k/v would also send attention to SDPA's math kernel)."""
    cfg = make_cfg(family="llama", iters=2, engine={"bf16": True})
    # A large LR: after 2 steps the logits are far from uniform, so bf16 rounding shows in the loss.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_iters=1, lr=3e-2))
    st, gbs, mbs = ParallelState(), cfg.train.global_batch_size, cfg.train.micro_batch_size
    model = build_model(cfg, st)
    valid = MicroBatches(held_out_dataset(cfg), gbs, mbs, 1, 0)
    state = train(cfg, st, TorchEngine(cfg, st, model), build_sampler(cfg),
                  MicroBatches(dataset(cfg), gbs, mbs, 1, 0), valid, log=MetricsLog(None, enabled=False))
    logged = [r["val_loss"] for r in state.history if "val_loss" in r]
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = [valid.get(0, m) for m in range(valid.num_micro)]
        direct = sum(float(model(t[:, :-1], t[:, 1:]).mean()) for t in tokens) / len(tokens)
    fp32 = evaluate(model, valid, 1, st)
    assert len(logged) == 1 and abs(logged[0] - direct) < 1e-6
    assert abs(fp32 - direct) > 5e-5  # the fp32 loss differs: the comparison can tell the two apart


def test_loss_scaler_rules():
    s = DynamicLossScaler(1024.0, min_scale=256.0, window=2, hysteresis=2)
    s.update(True)
    assert s.scale == 1024.0 and s.skipped_iterations == 1  # hysteresis: first overflow tolerated
    s.update(True)
    assert s.scale == 512.0
    s.update(False), s.update(False)
    assert s.scale == 1024.0  # window of clean steps doubles it
    for _ in range(8):
        s.update(True)
    assert s.scale == 256.0 and s.skipped_iterations == 10  # never below the minimum
    static = DynamicLossScaler(1.0, static=128.0)
    static.update(True)
    assert static.scale == 128.0 and static.skipped_iterations == 1


def test_apex_kernels_match_torch_native():
    from megatron_est.model import norms

    apex_fused_adam = kernels.apex_fused_adam
    if not (torch.cuda.is_available() and kernels.apex_norms() is not None and apex_fused_adam() is not None):
        pytest.skip("NVIDIA apex with its CUDA extensions is not available here")
    torch.manual_seed(0)
    x = torch.randn(4, 16, 64, device="cuda")
    for kind in ("layernorm", "rmsnorm"):
        norm = norms.Norm(kind, 64, 1e-5).cuda()
        with torch.no_grad():
            norm.weight.normal_()
        fused = norm(x)
        norms.set_use_apex(False)
        native = norm(x)
        norms.set_use_apex(True)
        torch.testing.assert_close(fused, native, rtol=1e-5, atol=1e-5)
    p1 = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))
    p2 = torch.nn.Parameter(p1.detach().clone())
    a = apex_fused_adam()([p1], lr=1e-2, weight_decay=0.1, adam_w_mode=True)
    b = torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(64, 64, device="cuda")
        p1.grad, p2.grad = g.clone(), g.clone()
        a.step(), b.step()
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)
