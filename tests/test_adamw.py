"""training/adamw.py: torch's fused AdamW stepping column-major parameters (parallel/storage.py) through their
contiguous transposes gives torch's own update on row-major copies, bit for bit, and leaves every tensor as it
was: the parameter's layout, the gradient object (the direct-gradient buffer is known by identity), the moments'
layout; moments loaded row-major (an older checkpoint) are laid out like the parameter."""
import torch

from megatron_est.config import TrainConfig
from megatron_est.model.language_model import LanguageModel
from megatron_est.parallel.storage import column_major
from megatron_est.training.optimizer import build_optimizer, param_groups
from tests.helpers import tiny


def _grads(model, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(memory_format=torch.contiguous_format)
        if column_major(p):
            p.grad = p.grad.t().contiguous().t()


def test_column_major_step_equals_torch_on_row_major_copies():
    tr = TrainConfig(weight_decay=0.1)
    ours = LanguageModel(tiny("gpt2"), seed=1)
    ref = LanguageModel(tiny("gpt2"), seed=1)
    with torch.no_grad():
        for p in ref.parameters():
            p.data = p.data.contiguous()
    cols = [p for p in ours.parameters() if column_major(p)]
    assert cols  # attention proj and MLP fc2 of every layer
    opt = build_optimizer(ours, tr)
    ref_opt = torch.optim.AdamW(param_groups(ref, tr), lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2),
                                eps=tr.adam_eps, fused=True)
    for step in range(3):
        _grads(ours, step)
        _grads(ref, step)
        held = {p: p.grad for p in cols}
        opt.step()
        ref_opt.step()
        for p in cols:
            assert column_major(p) and p.grad is held[p]
            assert all(column_major(opt.state[p][k]) for k in ("exp_avg", "exp_avg_sq"))
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], ref_opt.state[q][k]), (name, k)


def test_row_major_moments_are_laid_out_like_the_parameter():
    """Moments loaded row-major step like column-major ones and are re-laid out once."""
    tr = TrainConfig()
    models = [LanguageModel(tiny("gpt2"), seed=1) for _ in range(2)]
    opts = [build_optimizer(m, tr) for m in models]
    for step in range(2):
        for m, opt in zip(models, opts):
            _grads(m, step)
            opt.step()
        for p in models[1].parameters():  # as torch.load gives back a checkpoint saved row-major
            for k in ("exp_avg", "exp_avg_sq"):
                opts[1].state[p][k] = opts[1].state[p][k].contiguous()
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
        if column_major(p):
            # re-laid out at the second step, then made row-major again above: stepped correctly either way
            assert torch.equal(opts[0].state[p]["exp_avg"], opts[1].state[q]["exp_avg"])


def test_step_hooks_fire_once_per_step():
    """Another AdamW built first (torch then wraps its class's step too) must not make hooks fire twice."""
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    model = LanguageModel(tiny("gpt2"), seed=1)
    opt = build_optimizer(model, TrainConfig())
    fired = []
    opt.register_step_post_hook(lambda *_: fired.append(1))
    _grads(model, 0)
    opt.step()
    assert fired == [1]
