"""Checkpoints resume across machines: optimizer state with or without apex's FusedAdam, CUDA RNG state where a
process sees fewer GPUs (or none). apex and GPUs are not available here: FusedAdam's layout and update are
rebuilt in torch ops from NVIDIA/apex's source, and torch.cuda's RNG calls are replaced by a few fake devices."""
import io

import pytest
import torch

from megatron_est.parallel.state import ParallelState
from megatron_est.training import checkpointing
from megatron_est.training import optimizer as optim
from megatron_est.training import engine as plain_engine
from tests.engine_harness import make_cfg, run_plain, with_checkpoint


class ApexLayoutAdam(torch.optim.Optimizer):
    """apex.optimizers.FusedAdam (adam_w_mode=True, capturable=False) in torch ops. Its layout, from
    apex/optimizers/fused_adam.py: per parameter exp_avg / exp_avg_sq (fp32), created at a parameter's first
    gradient; one group["step"], advanced on every step() even for parameters without a gradient; groups carry
    bias_correction. Its update, from csrc/multi_tensor_adam.cu (ADAM_MODE_1):
    p -= lr * ((m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p)."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            if not g["params"]:
                continue
            g["step"] = g.get("step", 0) + 1
            b1, b2 = g["betas"]
            c1, c2 = (1 - b1 ** g["step"], 1 - b2 ** g["step"]) if g["bias_correction"] else (1.0, 1.0)
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p).float(), torch.zeros_like(p).float()
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.sub_(g["lr"] * ((m / c1) / ((v / c2).sqrt() + g["eps"]) + g["weight_decay"] * p))


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=gen)), torch.nn.Parameter(torch.randn(3, generator=gen))]


def _groups(params):  # Megatron's two groups: weight decay on matrices, none on vectors
    return [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]


def _steps(opt, params, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _adamw(params):
    return torch.optim.AdamW(_groups(params), lr=1e-2, foreach=True)


def _apex(params):
    return ApexLayoutAdam(_groups(params), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)


def _copy(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def test_reference_fused_adam_matches_torch_adamw():
    """The torch-ops FusedAdam against torch's AdamW from the same start: the same algorithm."""
    a, b = _params(), _params()
    opt_a, opt_b = _adamw(a), _apex(b)
    _steps(opt_a, a, 4, seed=1), _steps(opt_b, b, 4, seed=1)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert "step" not in opt_b.state[b[0]] and [g["step"] for g in opt_b.param_groups] == [4, 4]


def test_adamw_state_round_trips_through_fused_adam_layout():
    params = _params()
    opt = _adamw(params)
    _steps(opt, params, 3, seed=1)
    sd = opt.state_dict()
    fused = optim.param_steps_to_group_steps(sd)
    assert all("step" not in s for s in fused["state"].values())
    assert [(g["step"], g["bias_correction"]) for g in fused["param_groups"]] == [(3, True), (3, True)]
    back = optim.group_steps_to_param_steps(fused)
    assert [g for g in back["param_groups"]] == sd["param_groups"]
    for i, s in sd["state"].items():
        assert back["state"][i].keys() == s.keys()
        for k, v in s.items():
            assert torch.equal(back["state"][i][k], v) and back["state"][i][k].dtype == v.dtype, (i, k)


def test_fused_adam_layout_loads_into_adamw_and_continues_identically():
    original = _params()
    opt = _adamw(original)
    _steps(opt, original, 3, seed=1)
    # What FusedAdam's state_dict() holds, through torch.save (a state_dict() shares the live moment tensors).
    fused_sd = torch.load(_roundtrip(optim.param_steps_to_group_steps(opt.state_dict())), weights_only=True)
    with pytest.raises(KeyError):  # the old load: torch's own load_state_dict
        _adamw(_copy(original)).load_state_dict(fused_sd)
    resumed = _copy(original)
    opt_resumed = _adamw(resumed)
    optim.load_optimizer_state(opt_resumed, fused_sd)
    _steps(opt, original, 2, seed=2), _steps(opt_resumed, resumed, 2, seed=2)
    for x, y in zip(original, resumed):
        assert torch.equal(x, y)  # bit for bit: the same state, the same implementation
    assert [float(opt_resumed.state[p]["step"]) for p in resumed] == [5.0, 5.0]


@pytest.mark.parametrize("first,second", [(_adamw, _apex), (_apex, _adamw)])
def test_checkpoint_state_resumes_across_implementations(first, second):
    """Saved by one implementation (in the checkpoint layout), continued by the other: the same trajectory
    (within float rounding: the two compute the update in a different order) as continuing the first."""
    original = _params()
    opt = first(original)
    _steps(opt, original, 3, seed=1)
    saved = torch.load(_roundtrip(optim.optimizer_state_for_checkpoint(opt)), weights_only=True)
    assert all("step" in s for s in saved["state"].values())  # torch's layout, whichever implementation ran
    resumed = _copy(original)
    opt_resumed = second(resumed)
    optim.load_optimizer_state(opt_resumed, saved)
    _steps(opt, original, 3, seed=2), _steps(opt_resumed, resumed, 3, seed=2)
    for x, y in zip(original, resumed):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_gpu_optimizer_switches_do_not_travel_to_a_cpu_run():
    params = _params()
    gpu_like = torch.optim.AdamW(_groups(params), lr=1e-2, foreach=False, fused=False)
    _steps(gpu_like, params, 1, seed=1)
    sd = gpu_like.state_dict()
    for g in sd["param_groups"]:
        g["fused"] = True  # as saved by torch's fused CUDA AdamW
    cpu = _adamw(_copy(params))
    optim.load_optimizer_state(cpu, sd)
    assert [(g["fused"], g["foreach"]) for g in cpu.param_groups] == [(None, True), (None, True)]


def _roundtrip(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _apex_optimizer(model, tr, *args, **kwargs):
    """build_optimizer's groups and hyperparameters in the reference FusedAdam."""
    torch_opt = optim.build_optimizer(model, tr)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in torch_opt.param_groups]
    return ApexLayoutAdam(groups, lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps)


def test_run_saved_with_fused_adam_resumes_with_torch_adamw(tmp_path, monkeypatch):
    cfg = make_cfg()  # "adamw" unsampled update: every tensor steps every iteration, as FusedAdam requires
    full = run_plain(cfg, ParallelState())
    ckdir = str(tmp_path / "ck")
    with monkeypatch.context() as m:
        m.setattr(plain_engine, "build_optimizer", _apex_optimizer)  # what TorchEngine builds its optimizer with
        first = run_plain(with_checkpoint(cfg, save=ckdir, exit_interval=4), ParallelState())
    second = run_plain(with_checkpoint(cfg, save=ckdir, load=ckdir), ParallelState())
    assert first["end"] == 4 and second["start"] == 4 and second["end"] == 8
    for it in range(1, 9):
        losses = first["losses"] if it <= 4 else second["losses"]
        assert abs(losses[it] - full["losses"][it]) < 1e-4, it


# ------------------------------------------------------------------------------------------------- RNG
class FakeCuda:
    """n visible GPUs with one RNG state each; an index past them fails as CUDA does."""

    def __init__(self, monkeypatch, n: int, current: int = 0):
        self.states = [torch.full((8,), i, dtype=torch.uint8) for i in range(n)]
        self.current, self.set_calls = current, []
        for name, fn in (("is_available", lambda: True), ("is_initialized", lambda: True),
                         ("current_device", lambda: self.current), ("device_count", lambda: n),
                         ("get_rng_state", self.get), ("set_rng_state", self.set)):
            monkeypatch.setattr(torch.cuda, name, fn)
        monkeypatch.setattr(torch.cuda.random, "set_rng_state", self.set)  # what set_rng_state_all calls

    def _index(self, device) -> int:
        index = self.current if device in ("cuda", None) else int(getattr(device, "index", device))
        if index >= len(self.states):
            raise RuntimeError("CUDA error: invalid device ordinal")
        return index

    def get(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set(self, state, device="cuda"):
        index = self._index(device)
        self.states[index] = state.clone()
        self.set_calls.append(index)


def test_cuda_rng_state_of_the_current_device_only(monkeypatch):
    FakeCuda(monkeypatch, n=4, current=2)
    saved = torch.load(_roundtrip(checkpointing.get_rng_state()), weights_only=True)
    assert saved["cuda"]["device"] == 2 and torch.equal(saved["cuda"]["state"], torch.full((8,), 2, dtype=torch.uint8))


def _with_cuda(cuda):
    return {**checkpointing.get_rng_state(), "cuda": cuda}


@pytest.mark.parametrize("saved_cuda,visible,current,expect", [
    ({"device": 3, "state": torch.full((8,), 7, dtype=torch.uint8)}, 1, 0, 7),  # saved on GPU 3, one GPU now
    ([torch.full((8,), 10 + i, dtype=torch.uint8) for i in range(4)], 1, 0, 10),  # old list of 4, one GPU
    ([torch.full((8,), 10 + i, dtype=torch.uint8) for i in range(4)], 2, 1, 11),  # old list, same layout
    ([torch.full((8,), 10 + i, dtype=torch.uint8) for i in range(2)], 4, 3, 10),  # old list, a higher index
])
def test_cuda_rng_restored_onto_the_current_device(monkeypatch, saved_cuda, visible, current, expect):
    state = _with_cuda(saved_cuda)
    fake = FakeCuda(monkeypatch, n=visible, current=current)
    checkpointing.set_rng_state(state)
    assert fake.set_calls == [current] and int(fake.states[current][0]) == expect


def test_cpu_checkpoint_on_gpu_restores_no_cuda_state(monkeypatch):
    state = checkpointing.get_rng_state()
    assert state["cuda"] is None
    fake = FakeCuda(monkeypatch, n=2)
    checkpointing.set_rng_state(state)
    assert fake.set_calls == []


@pytest.mark.parametrize("saved_cuda", [{"device": 1, "state": torch.zeros(8, dtype=torch.uint8)},
                                        [torch.zeros(8, dtype=torch.uint8)] * 2])
def test_gpu_checkpoint_rng_on_cpu(saved_cuda):
    torch.manual_seed(5)
    state = _with_cuda(saved_cuda)
    expect = torch.rand(3)
    torch.manual_seed(6)
    checkpointing.set_rng_state(state)  # no GPU here: the CUDA state is ignored, the others restored
    assert torch.equal(torch.rand(3), expect)
