"""The sliced subnetwork equals the masking oracle (loss and gradients), for GPT-2 and Llama with GQA."""
import pytest
import torch

from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges
from megatron_est.est.schedule import Schedule, Stage
from megatron_est.model.language_model import LanguageModel
from tests.helpers import tiny, token_batch
from tests.masking_oracle import oracle_loss


def _sub(cfg, rates, seed=11, iteration=5, stratified=True, rescale=False):
    sched = Schedule((Stage(0, *rates),))
    strata = Strata(2, 2, even_ranges(cfg.num_layers, 1))
    return SubnetworkSampler(cfg, sched, seed, strata, stratified, rescale)(iteration)


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn().mean()
    loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    return loss.detach(), grads


CASES = [
    ((0.5, 0.5, 0.5), True, False),
    ((0.5, 0.5, 0.5), True, True),
    ((0.5, 0.25, 1.0), True, False),
    ((0.25, 0.75, 1.0), False, False),  # unstratified: uneven heads per KV group / shard
    ((1.0, 1.0, 0.5), True, True),
]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("rates,stratified,rescale", CASES)
def test_sliced_equals_masking_oracle(family, rates, stratified, rescale):
    cfg = tiny(family, num_layers=4)
    model = LanguageModel(cfg, seed=5)
    ids, labels = token_batch(cfg)
    sub = _sub(cfg, rates, stratified=stratified, rescale=rescale)
    assert not sub.is_full
    plan = model.make_plan(sub)
    got_loss, got = _loss_and_grads(model, lambda: model(ids, labels, plan))
    ref_loss, ref = _loss_and_grads(model, lambda: oracle_loss(model, ids, labels, sub))
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_oracle_detects_a_wrong_scale():
    """The comparison can fail: a subnetwork whose rescale is off by a little is caught."""
    cfg = tiny("gpt2", num_layers=2)
    model = LanguageModel(cfg, seed=5)
    ids, labels = token_batch(cfg)
    sub = _sub(cfg, (0.5, 0.5, 1.0))
    plan = model.make_plan(sub)
    for lp in plan.layers.values():
        lp.mlp.scale *= 1.01
    with torch.no_grad():
        assert not torch.allclose(model(ids, labels, plan).mean(), oracle_loss(model, ids, labels, sub).mean(),
                                  rtol=1e-5, atol=1e-6)


def test_unsampled_parameters_get_zero_gradient():
    cfg = tiny("llama", num_layers=4)
    model = LanguageModel(cfg, seed=5)
    ids, labels = token_batch(cfg)
    sub = _sub(cfg, (0.5, 0.5, 0.5))
    model(ids, labels, model.make_plan(sub)).mean().backward()
    for i, layer in enumerate(model.decoder.layers):
        if i not in sub.layers:
            assert all(p.grad is None for p in layer.parameters())
            continue
        dropped = torch.ones(cfg.ffn_hidden_size, dtype=torch.bool)
        dropped[sub.neurons[i]] = False
        assert layer.mlp.gate.weight.grad[dropped].abs().max() == 0
        assert layer.mlp.fc2.weight.grad[:, dropped].abs().max() == 0
        assert layer.mlp.gate.weight.grad[~dropped].abs().max() > 0
