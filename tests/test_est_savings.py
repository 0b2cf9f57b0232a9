"""The schedule-savings tool: equals a real run's logged FLOPs, and the paper presets give their savings."""
import pytest

from megatron_est.config import Config, ESTConfig, TrainConfig, model_preset
from megatron_est.est.build import build_sampler
from megatron_est.est.savings import saving, schedule_flops
from megatron_est.model.language_model import LanguageModel
from megatron_est.training.batches import MicroBatches, RandomTokens
from megatron_est.training.engine import TorchEngine
from megatron_est.training.loop import train
from megatron_est.training.metrics import MetricsLog
from tests.helpers import tiny
from tools.est_flops import main as est_flops_main


def test_tool_equals_cumulative_flops_of_a_real_run():
    cfg = Config(model=tiny("llama", num_layers=4), est=ESTConfig(schedule="0:0.5,0.25,0.5;3:0.25,0.5,1;6:1,1,1"),
                 train=TrainConfig(micro_batch_size=2, train_iters=8, log_interval=1, eval_interval=100))
    model = LanguageModel(cfg.model, seed=1)
    batches = MicroBatches(RandomTokens(cfg.model.vocab_size, cfg.model.seq_length, n=32), 2, 2, 1, 0)
    st = _single()
    state = train(cfg, st, TorchEngine(cfg, st, model), build_sampler(cfg), batches, None,
                  log=MetricsLog(None, enabled=False))
    stages = schedule_flops(cfg.model, build_sampler(cfg), 8, 2 * cfg.model.seq_length)
    assert sum(s.flops for s in stages) == state.cumulative_flops
    assert sum(s.full_flops for s in stages) == state.full_cumulative_flops
    assert [s.iterations for s in stages] == [3, 3, 2]


def _single():
    from megatron_est.parallel.state import ParallelState
    return ParallelState()


@pytest.mark.parametrize("preset,schedule,expected", [("gpt2-124m", "gpt2-paper", 0.267),
                                                      ("tinyllama-1.1b", "tinyllama-paper", 0.250)])
def test_paper_presets_give_the_documented_savings(preset, schedule, expected):
    cfg = Config(model=model_preset(preset), est=ESTConfig(schedule=schedule), train=TrainConfig(train_iters=1000))
    assert saving(schedule_flops(cfg.model, build_sampler(cfg), 1000, cfg.model.seq_length)) == \
        pytest.approx(expected, abs=0.0005)


def test_cli_prints_the_saving(capsys):
    total = est_flops_main(["--model-preset", "gpt2-124m", "--est-schedule", "gpt2-paper", "--train-iters", "1000"])
    assert total == pytest.approx(0.267, abs=0.0005)
    assert f"{100 * total:.2f}% saved" in capsys.readouterr().out
