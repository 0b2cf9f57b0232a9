"""Sliced weights add their gradients straight into .grad (parallel/sliced_grad.py): bit for bit autograd's own
full-size index_select gradients, over micro-batch accumulation and consecutive steps on different subnetworks;
autograd's path where the accumulation is hooked (DeepSpeed) or the switch is off."""
import pytest
import torch

from megatron_est.est.sampler import Strata, SubnetworkSampler, even_ranges
from megatron_est.est.schedule import Schedule, Stage
from megatron_est.model.language_model import LanguageModel
from megatron_est.parallel.sliced_grad import set_direct_grads
from tests.helpers import tiny, token_batch


def _grads_over_steps(model, direct: bool, family: str) -> list[dict]:
    """Three steps (two sampled subnetworks, then the full model, then a sampled one), two micro-batches each;
    every gradient after each step."""
    cfg = model.cfg
    set_direct_grads(model, direct)
    sampler = SubnetworkSampler(cfg, Schedule((Stage(0, 0.5, 0.5, 0.5),)), 7,
                                Strata(1, 1, even_ranges(cfg.num_layers, 1)))
    out = []
    for it, sub in enumerate((sampler(0), sampler(1), None, sampler(2))):
        model.zero_grad(set_to_none=True)
        plan = model.make_plan(sub)
        for mb in range(2):
            ids, labels = token_batch(cfg, seed=10 * it + mb)
            model(ids, labels, plan).mean().backward()
        out.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_direct_grads_equal_autograd_bitwise(family):
    model = LanguageModel(tiny(family, num_layers=4), seed=5)
    want = _grads_over_steps(model, False, family)
    got = _grads_over_steps(model, True, family)
    sliced = 0
    for step_got, step_want in zip(got, want):
        assert step_got.keys() == step_want.keys()
        for name, g in step_want.items():
            if g is None:
                assert step_got[name] is None, name
                continue
            assert torch.equal(step_got[name], g), name
            sliced += int((g == 0).any() and (g != 0).any())
    assert sliced > 0  # some weights were sliced, so the direct path ran
    assert any(hasattr(p, "_direct_grad_buffer") for p in model.parameters())


def test_hooked_accumulation_keeps_autograds_path():
    """A post-accumulate-grad hook (how DeepSpeed ZeRO collects gradients) still fires for a sliced weight."""
    cfg = tiny("gpt2", num_layers=2)
    model = LanguageModel(cfg, seed=5)
    w = model.decoder.layers[0].mlp.fc1.weight
    fired = []
    w.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))
    sub = SubnetworkSampler(cfg, Schedule((Stage(0, 0.5, 0.5, 1.0),)), 7, Strata(1, 1, even_ranges(2, 1)))(0)
    ids, labels = token_batch(cfg)
    model(ids, labels, model.make_plan(sub)).mean().backward()
    assert len(fired) == 1 and torch.equal(fired[0], w.grad)
    assert not hasattr(w, "_direct_grad_buffer")


def test_buffer_is_reused_unless_someone_holds_it():
    """The buffer is zeroed and reused across steps (no fresh allocation), but never while a caller still holds
    last step's gradient or a view of it: those stay as they were."""
    cfg = tiny("gpt2", num_layers=2)
    model = LanguageModel(cfg, seed=5)
    sampler = SubnetworkSampler(cfg, Schedule((Stage(0, 0.5, 0.5, 1.0),)), 7, Strata(1, 1, even_ranges(2, 1)))
    ids, labels = token_batch(cfg)
    w = model.decoder.layers[0].mlp.fc1.weight

    def step(it):
        model.zero_grad(set_to_none=True)
        model(ids, labels, model.make_plan(sampler(it))).mean().backward()

    step(0)
    first = id(w.grad)
    step(1)
    assert id(w.grad) == first  # reused
    held, held_copy = w.grad, w.grad.clone()
    step(2)
    assert w.grad is not held and torch.equal(held, held_copy)
    view, view_copy = w.grad[1], w.grad[1].clone()
    del held
    step(3)
    assert torch.equal(view, view_copy)


def test_post_accumulate_hooks_fire_once_per_backward_on_the_final_grad():
    """What the overlapped reduction's hooks rely on: autograd still runs the accumulation node of a directly
    written weight, once per backward, after the write."""
    from megatron_est.parallel.grad_overlap import _marked
    from megatron_est.parallel.sliced_grad import sliced_weight

    p = torch.nn.Parameter(torch.randn(6, 3))
    seen = []
    p.register_post_accumulate_grad_hook(_marked(lambda t: seen.append(t.grad.clone())))
    for _ in range(2):
        (sliced_weight(p, 0, torch.tensor([1, 4])) ** 2).sum().backward()
    assert hasattr(p, "_direct_grad_buffer") and len(seen) == 2
    want = torch.zeros(6, 3)
    want[[1, 4]] = 2 * p.detach()[[1, 4]]
    assert torch.equal(seen[0], want) and torch.equal(seen[1], 2 * want)


def _graph_names(fn) -> set[str]:
    seen, todo = {}, [fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node.name()
        todo.extend(n for n, _ in node.next_functions)
    return set(seen.values())


@pytest.mark.parametrize("family,pre_process,batch", [("gpt2", True, 2), ("llama", True, 2), ("gpt2", False, 2),
                                                      ("gpt2", True, 16), ("llama", True, 16)])
def test_embedding_and_head_gradients_equal_autograd_bitwise(family, pre_process, batch):
    """The word embedding's rows and the LM head (parallel/embedding_grad.py): autograd's gradient bit for bit,
    tied (GPT-2) or not (Llama), with one stage holding both or only the head (a last pipeline stage's tied copy),
    many repeated ids (each row sums several gradients), two micro-batches and a second step. With more ids than
    vocabulary rows (batch 16: 512 ids, 256 rows) the lookup takes autograd's path, and a tied head with it."""
    cfg = tiny(family, num_layers=1, vocab_size=200)
    model = LanguageModel(cfg, seed=3, pre_process=pre_process)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 9, (batch, cfg.seq_length + 1), generator=g) for _ in range(4)]

    def grads(direct: bool):
        set_direct_grads(model, direct)
        out, names = [], set()
        for step in range(2):
            model.zero_grad(set_to_none=True)
            for t in batches[2 * step: 2 * step + 2]:
                x = t[:, :-1] if pre_process else torch.randn(batch, cfg.seq_length, cfg.hidden_size, generator=g)
                loss = model(x, t[:, 1:]).mean()
                names |= _graph_names(loss.grad_fn)
                loss.backward()
            out.append({n: p.grad.clone() for n, p in model.named_parameters()
                        if "embedding" in n or "output" in n})
        return out, names

    want, auto_names = grads(False)
    g.manual_seed(0)
    batches = [torch.randint(0, 9, (batch, cfg.seq_length + 1), generator=g) for _ in range(4)]
    got, direct_names = grads(True)
    lookup = pre_process and batch == 2
    assert "_HeadBackward" not in auto_names and "_LookupBackward" not in auto_names
    assert ("_LookupBackward" in direct_names) == lookup
    tied_autograd = pre_process and not lookup and cfg.tie_embeddings
    assert ("_HeadBackward" in direct_names) == (not tied_autograd)
    for step_got, step_want in zip(got, want):
        assert step_got.keys() == step_want.keys() and step_got
        for name in step_want:
            assert torch.equal(step_got[name], step_want[name]), name
    assert not any("_head_grad" in p.__dict__ for p in model.parameters())
