"""The plain engine's freeze step (est/unsampled.py FreezeUpdate: skipped layers sit out, sliced weights step on
compact copies of their kept slices) equals freeze's definition (every tensor takes a full AdamW step on a
zero-filled gradient, then the frozen elements' values and moments are written back): bit for bit with torch's
multi-tensor AdamW, to rounding with its fused kernel; step counts are the global step either way."""
import pytest
import torch

from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges
from megatron_est.est.schedule import Schedule, Stage
from megatron_est.est.unsampled import FreezeUpdate, Hold, frozen_elements, torch_fragments
from megatron_est.model.language_model import LanguageModel
from tests.helpers import tiny, token_batch


def _defining_step(optimizer, model, plan) -> None:
    frozen = frozen_elements(model, plan)
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    hold = Hold(torch_fragments(optimizer, frozen))
    optimizer.step()
    hold.restore()


def _train(family: str, impl: dict, step_fn) -> tuple[LanguageModel, torch.optim.Optimizer]:
    cfg = tiny(family, num_layers=4)
    model = LanguageModel(cfg, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), **impl)
    sched = Schedule((Stage(0, 1.0, 1.0, 1.0), Stage(1, 0.5, 0.5, 0.5), Stage(3, 0.25, 0.5, 1.0)))
    sampler = SubnetworkSampler(cfg, sched, 5, Strata(1, 1, even_ranges(cfg.num_layers, 1)))
    for it in range(5):  # full, then stage 1 twice, then stage 2 twice
        plan = model.make_plan(sampler(it))
        opt.zero_grad(set_to_none=True)
        for mb in range(2):
            ids, labels = token_batch(cfg, seed=10 * it + mb)
            model(ids, labels, plan).mean().backward()
        step_fn(opt, model, plan)
    return model, opt


def _compare(a, b, exact: bool) -> None:
    (model_a, opt_a), (model_b, opt_b) = a, b
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        pairs = [(p, q)] + [(opt_a.state[p][k], opt_b.state[q][k]) for k in ("exp_avg", "exp_avg_sq")]
        for x, y in pairs:
            if exact:
                assert torch.equal(x, y), name
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-8, msg=name)
        assert float(opt_a.state[p]["step"]) == float(opt_b.state[q]["step"]) == 5.0, name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_narrowed_freeze_equals_the_definition_bitwise(family):
    impl = {"foreach": True}
    _compare(_train(family, impl, FreezeUpdate().step), _train(family, impl, _defining_step), exact=True)


def test_narrowed_freeze_equals_the_definition_fused():
    impl = {"fused": True}
    _compare(_train("llama", impl, FreezeUpdate().step), _train("llama", impl, _defining_step), exact=False)


def test_the_definition_differs_from_plain_adamw():
    """The comparison can fail: without the write-back (plain AdamW on zero-filled gradients) it does."""
    def adamw_step(optimizer, model, plan):
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        optimizer.step()

    with pytest.raises(AssertionError):
        _compare(_train("gpt2", {"foreach": True}, adamw_step),
                 _train("gpt2", {"foreach": True}, _defining_step), exact=True)
