"""Kernel choices: apex counts only with its CUDA extensions (fake packages on sys.path), apex never on CPU
tensors, and the TF32 decision (compute capability, --no-tf32)."""
import importlib
import sys

import pytest
import torch

from megatron_est import kernels
from megatron_est.arguments import parse_args
from megatron_est.model.language_model import LanguageModel
from megatron_est.model.norms import Norm, apex_active
from megatron_est.training.optimizer import build_optimizer
from tests.helpers import tiny

# What an apex install without --cuda_ext provides: the Python modules import, the extensions do not exist
# (the names are apex's own: apex/normalization/fused_layer_norm.py, apex/optimizers/fused_adam.py).
_FAKE_APEX = {
    "apex/__init__.py": "",
    "apex/normalization/__init__.py": "",
    "apex/normalization/fused_layer_norm.py": "def fused_layer_norm_affine(*a):\n    raise RuntimeError\n"
                                              "def fused_rms_norm_affine(*a):\n    raise RuntimeError\n",
    "apex/optimizers/__init__.py": "class FusedAdam:\n    pass\n",
}
_EXTENSIONS = {f"{kernels.NORM_EXTENSION}.py": "", f"{kernels.ADAM_EXTENSION}.py": ""}
_FAKE_TOP_LEVEL = ("apex", kernels.NORM_EXTENSION, kernels.ADAM_EXTENSION)


@pytest.fixture
def fake_apex(tmp_path, monkeypatch):
    """Install fake packages under tmp_path (a function taking {path: source}); the detection caches and the
    imported modules are dropped before and after."""
    def forget():
        for name in [m for m in sys.modules if m.split(".")[0] in _FAKE_TOP_LEVEL]:
            del sys.modules[name]
        kernels.apex_norms.cache_clear()
        kernels.apex_fused_adam.cache_clear()

    def install(files: dict) -> None:
        for rel, src in files.items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(src)
        importlib.invalidate_caches()
        forget()

    monkeypatch.syspath_prepend(str(tmp_path))
    yield install
    monkeypatch.undo()
    forget()


def test_apex_without_cuda_extensions_is_not_used(fake_apex):
    fake_apex(_FAKE_APEX)
    importlib.import_module("apex.optimizers")  # what the old detection (a plain import) took for apex
    importlib.import_module("apex.normalization.fused_layer_norm")
    assert kernels.apex_norms() is None and kernels.apex_fused_adam() is None


def test_apex_with_its_extensions_is_detected_but_never_on_cpu_tensors(fake_apex):
    fake_apex({**_FAKE_APEX, **_EXTENSIONS})
    assert kernels.apex_norms() is not None and kernels.apex_fused_adam().__module__ == "apex.optimizers"
    x = torch.randn(2, 8)
    norm = Norm("layernorm", 8, 1e-5)
    assert not apex_active(x)  # the fake kernels raise if called: the CPU path must stay torch's
    torch.testing.assert_close(norm(x), torch.nn.functional.layer_norm(x, (8,), eps=1e-5))
    opt = build_optimizer(LanguageModel(tiny("gpt2", num_layers=1), seed=0), parse_args([], "", "gpt2-tiny").train)
    assert isinstance(opt, torch.optim.AdamW)  # CPU parameters: torch's AdamW


@pytest.mark.parametrize("capability,flag,expected", [((7, 0), True, False), ((8, 0), True, True),
                                                       ((9, 0), True, True), ((8, 0), False, False),
                                                       ((9, 0), False, False), (None, True, False)])
def test_tf32_decision(capability, flag, expected):
    assert kernels.tf32_wanted(flag, capability) is expected


def test_tf32_flag_and_cpu_setting():
    assert parse_args([], "", "gpt2-tiny").engine.tf32 is True
    assert parse_args(["--no-tf32"], "", "gpt2-tiny").engine.tf32 is False
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = True  # torch's default: configure_tf32 must switch it off as well
        assert kernels.configure_tf32(True, torch.device("cpu")) is False
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
        line = kernels.configure_kernels(parse_args([], "", "gpt2-tiny").engine, torch.device("cpu"), None)
        assert line == "> kernels: TF32 matmuls off (no GPU) | norms: torch | optimizer: DeepSpeed's"
        line = kernels.configure_kernels(parse_args(["--no-tf32"], "", "gpt2-tiny").engine, torch.device("cpu"),
                                         torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]))
        assert line == "> kernels: TF32 matmuls off (--no-tf32) | norms: torch | optimizer: torch.optim.adamw.AdamW"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
