"""Throughput in the records and the log line: tokens/s, TFLOP/s per device of the subnetwork and of the full
model, MFU against --peak-tflops; each checked against the step's own FLOPs and time (hand arithmetic)."""
import dataclasses

import pytest

from megatron_est.parallel.state import ParallelState
from megatron_est.training.metrics import format_train_line
from megatron_est.training.throughput import peak_for_name
from tests.engine_harness import make_cfg, run_plain


def test_records_carry_throughput_consistent_with_flops_and_time():
    cfg = make_cfg(iters=4)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, peak_tflops=0.5))
    recs = run_plain(cfg, ParallelState())["records"]
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    for r in recs:  # log interval 1: each record covers one step, on one device
        assert r["tokens_per_s"] * r["interval_time_s"] == pytest.approx(tokens_per_step, rel=1e-9)
        assert r["tflops_per_device"] * 1e12 * r["interval_time_s"] == pytest.approx(r["step_flops"], rel=1e-9)
        assert r["full_model_tflops_per_device"] / r["tflops_per_device"] == pytest.approx(
            r["full_step_flops"] / r["step_flops"], rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.5, rel=1e-12)
    assert recs[0]["step_flops"] < recs[0]["full_step_flops"]  # an EST stage: the two rates differ
    line = format_train_line(recs[0], 4)
    assert "tokens/s" in line and "TFLOP/s/device" in line and "MFU:" in line


def test_no_mfu_without_a_known_peak():
    recs = run_plain(make_cfg(iters=2), ParallelState())["records"]  # CPU: no peak known
    assert "mfu" not in recs[0] and "tokens_per_s" in recs[0]
    assert "MFU" not in format_train_line(recs[0], 2)


def test_peak_by_device_name():
    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_for_name("NVIDIA H100 PCIe") == 756.0
    assert peak_for_name("NVIDIA H200") == 989.0
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_for_name("Some Future GPU") is None
