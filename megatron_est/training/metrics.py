"""Megatron-style log line on rank 0 and a JSON-lines metrics file."""
from __future__ import annotations

import json
import os
from typing import Optional, TextIO


class MetricsLog:
    """sinks: objects with record(obj) and close() that get every record too (training/scalar_logs.py:
    TensorBoard, W&B); only when enabled (rank 0)."""

    def __init__(self, path: Optional[str], enabled: bool, append: bool = False,
                 keep_through: Optional[int] = None):
        """keep_through: the iteration a run resumes from; records logged after it (by the killed run, past its
        last checkpoint) are dropped before appending, so each iteration appears once."""
        self.enabled = enabled
        self.file: Optional[TextIO] = None
        self.sinks: list = []
        if enabled and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if append and keep_through is not None:
                truncate_records(path, keep_through)
            self.file = open(path, "a" if append else "w")

    def record(self, obj: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(obj) + "\n")
            self.file.flush()
        if self.enabled:
            for sink in self.sinks:
                sink.record(obj)

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def truncate_records(path: str, keep_through: int) -> None:
    """Drop the records of a JSON-lines metrics file with iteration > keep_through, and any line a kill cut
    short; rewritten through a temporary file and os.replace, so a second kill leaves the old or the new file."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            if not isinstance(rec, dict) or rec.get("iteration", 0) <= keep_through:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def format_train_line(r: dict, train_iters: int) -> str:
    """The log line, in Megatron's shape, with EST fields appended."""
    return (f" iteration {r['iteration']:8d}/{train_iters:8d} | consumed samples: {r['consumed_samples']:12d} |"
            f" elapsed time per iteration (ms): {1000 * r['interval_time_s']:.1f} |"
            f" learning rate: {r['lr']:.3E} | global batch size: {r['global_batch_size']:5d} |"
            f" lm loss: {r['lm_loss']:.6E} | grad norm: {r['grad_norm']:.3f} |"
            f" est stage: {r['est_stage']} | kept layers/heads/mlp: {r['kept_layers']}/"
            f"{r['kept_heads_frac']:.2f}/{r['kept_mlp_frac']:.2f} |"
            f" step TFLOP: {r['step_flops'] / 1e12:.4f} (full {r['full_step_flops'] / 1e12:.4f}) |"
            f" FLOPs saved so far: {100 * r['flops_saved_frac']:.1f}% |"
            + (f" loss scale: {r['loss_scale']:.1f} | number of skipped iterations: {r['skipped_iterations']:3d} |"
               if "loss_scale" in r else "")
            + (f" number of nan iterations: {r['nonfinite_steps']:3d} |" if r.get("nonfinite_steps") else "")
            + (f" throughput: {r['tokens_per_s']:.0f} tokens/s | TFLOP/s/device: {r['tflops_per_device']:.3g} (full"
               f" model {r['full_model_tflops_per_device']:.3g}) |" if "tokens_per_s" in r else "")
            + (f" MFU: {100 * r['mfu']:.1f}% |" if "mfu" in r else ""))
