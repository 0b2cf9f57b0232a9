"""--est-unsampled-update freeze leaves parameters outside the subnetwork, and their AdamW state, untouched."""
import pytest
import torch

from megatron_est.config import Config, ESTConfig, TrainConfig
from megatron_est.est.build import build_sampler
from megatron_est.model.language_model import LanguageModel
from megatron_est.parallel.state import ParallelState
from megatron_est.training.batches import MicroBatches, RandomTokens
from megatron_est.training.engine import TorchEngine
from tests.helpers import tiny


def _two_steps(family: str, mode: str):
    """Step 0 trains the full model (AdamW moments become non-zero), step 1 a sampled subnetwork."""
    cfg = Config(model=tiny(family, num_layers=4), est=ESTConfig(schedule="0:1,1,1;1:0.5,0.5,0.5",
                                                                unsampled_update=mode),
                 train=TrainConfig(micro_batch_size=2, train_iters=2, lr=1e-2, lr_warmup_iters=0))
    st = ParallelState()
    model = LanguageModel(cfg.model, st, seed=3)
    engine = TorchEngine(cfg, st, model)
    opt, params = engine.optimizer, list(model.parameters())
    batches = MicroBatches(RandomTokens(cfg.model.vocab_size, cfg.model.seq_length, n=8), 2, 2, 1, 0)
    sampler = build_sampler(cfg)
    engine.step(batches, sampler(0), 0)
    before = {p: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params}
    sub = sampler(1)
    engine.step(batches, sub, 1)
    return model, opt, sub, before


def _rows(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(dim, idx)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_freeze_leaves_unsampled_untouched(family):
    model, opt, sub, before = _two_steps(family, "freeze")
    for i, layer in enumerate(model.decoder.layers):
        if i not in sub.layers:  # skipped layer: parameters and moments unchanged; the step count is global
            for p in layer.parameters():
                assert torch.equal(p, before[p][0])
                assert all(torch.equal(opt.state[p][k], v) for k, v in before[p][1].items() if k != "step")
                assert float(opt.state[p]["step"]) == 2.0
    slices = model.trained_slices(model.make_plan(sub))
    assert len(slices) >= 2 * len(sub.layers)
    for p, dim, kept in slices:
        drop = torch.ones(p.shape[dim], dtype=torch.bool)
        drop[kept] = False
        drop = drop.nonzero().squeeze(1)
        old, old_state = before[p]
        assert torch.equal(_rows(p, dim, drop), _rows(old, dim, drop))
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(_rows(opt.state[p][k], dim, drop), _rows(old_state[k], dim, drop))
        assert not torch.equal(_rows(p, dim, kept), _rows(old, dim, kept))  # the sampled part did train


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_freeze_moves_exactly_what_the_gradient_reaches(family):
    """An oracle independent of LanguageModel.trained_slices: under freeze an element changes if and only if
    the step's gradient (autograd through the sliced forward) reached it; AdamW would also move the others.
    Layer weight matrices only: embedding rows of absent tokens are not EST's (AdamW moves them in both modes),
    and a key bias has an exactly-zero gradient in exact arithmetic (softmax ignores a shift of all scores)."""
    model, _, sub, before = _two_steps(family, "freeze")
    checked = 0
    for p in (p for layer in model.decoder.layers for p in layer.parameters() if p.ndim == 2):
        reached = torch.zeros_like(p, dtype=torch.bool) if p.grad is None else p.grad != 0
        changed = p.detach() != before[p][0]
        assert torch.equal(changed, reached)
        checked += int((~reached).any() and reached.any())  # a weight sliced this step
    assert checked >= 2 * len(sub.layers)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adamw_mode_moves_unsampled_parameters(family):
    """The control: without freezing, momentum and weight decay move what was not sampled."""
    model, opt, sub, before = _two_steps(family, "adamw")
    skipped = [i for i in range(len(model.decoder.layers)) if i not in sub.layers]
    p = model.decoder.layers[skipped[0]].mlp.fc2.weight
    assert not torch.equal(p, before[p][0])
    for p, dim, kept in model.trained_slices(model.make_plan(sub)):
        drop = torch.ones(p.shape[dim], dtype=torch.bool)
        drop[kept] = False
        assert not torch.equal(_rows(p, dim, drop.nonzero().squeeze(1)), _rows(before[p][0], dim, drop.nonzero().squeeze(1)))


def test_adamw_is_the_default_everywhere_and_auto_is_gone():
    from megatron_est.config import ConfigError, EngineConfig, ParallelConfig
    from megatron_est.validation import validate

    assert ESTConfig().unsampled_update == "adamw"
    for cfg, world in ((Config(model=tiny("gpt2", num_layers=4)), 1),
                       (Config(model=tiny("gpt2", num_layers=4),
                               parallel=ParallelConfig(pipeline_model_parallel_size=2)), 2),
                       (Config(model=tiny("gpt2", num_layers=4), engine=EngineConfig(deepspeed=True)), 1)):
        validate(cfg, world)  # accepted: tests/test_pipeline.py and test_freeze_engines.py train these
    with pytest.raises(ConfigError, match="--est-unsampled-update: unknown value 'auto'"):
        validate(Config(model=tiny("gpt2"), est=ESTConfig(unsampled_update="auto")), 1)
