"""TensorBoard and W&B scalars from the metrics records, under Megatron's tag names plus ours.

Megatron's: "lm loss" (also "vs samples"), "learning-rate", "batch-size", "grad-norm", "loss-scale",
"iteration-time" (seconds), "throughput" (TFLOP/s per GPU, from the FLOPs actually run), "lm loss validation",
"lm loss validation ppl". Ours: "lm loss vs tokens", "est/step-flops",
"est/full-step-flops", "est/flops-saved-so-far" (fraction), "est/stage", "est/kept-layers",
"est/kept-heads-fraction", "est/kept-mlp-fraction", "<name> lm loss validation" for each held-out set,
"downstream/<task> <metric>" for in-training zero-shot tasks. Steps are iterations unless the tag says "vs".
"""
from __future__ import annotations

import math
import os

from megatron_est.config import Config, ConfigError

_TRAIN = (("lm loss", "lm_loss"), ("learning-rate", "lr"), ("batch-size", "global_batch_size"),
          ("grad-norm", "grad_norm"), ("loss-scale", "loss_scale"), ("iteration-time", "interval_time_s"),
          ("est/step-flops", "step_flops"), ("est/full-step-flops", "full_step_flops"),
          ("est/flops-saved-so-far", "flops_saved_frac"), ("est/stage", "est_stage"),
          ("est/kept-layers", "kept_layers"), ("est/kept-heads-fraction", "kept_heads_frac"),
          ("est/kept-mlp-fraction", "kept_mlp_frac"))


def scalars(rec: dict, world_size: int = 1) -> list[tuple[str, float, int]]:
    """(tag, value, step) for one metrics record; missing and NaN values (an fp16 skipped step) left out."""
    it, out = rec["iteration"], []
    if "lm_loss" in rec:
        out += [(tag, float(rec[key]), it) for tag, key in _TRAIN if key in rec]
        out += [("lm loss vs samples", float(rec["lm_loss"]), rec["consumed_samples"]),
                ("lm loss vs tokens", float(rec["lm_loss"]), rec["tokens"])]
        if rec.get("interval_time_s"):
            out.append(("throughput", rec["step_flops"] / rec["interval_time_s"] / world_size / 1e12, it))
    if "val_loss" in rec:
        v = float(rec["val_loss"])
        out += [("lm loss validation", v, it), ("lm loss validation ppl", math.exp(min(v, 80.0)), it)]
    out += [(f"{name} lm loss validation", float(v), it) for name, v in rec.get("extra_val_loss", {}).items()]
    out += [(f"downstream/{task} {metric}", float(v), it) for task, row in rec.get("downstream", {}).items()
            for metric, v in row.items() if isinstance(v, (int, float)) and not metric.endswith("stderr")]
    return [(t, v, s) for t, v, s in out if not math.isnan(v)]


class TensorBoardSink:
    def __init__(self, log_dir: str, world_size: int):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer, self.world_size = SummaryWriter(log_dir=log_dir), world_size

    def record(self, rec: dict) -> None:
        for tag, value, step in scalars(rec, self.world_size):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a crash or preemption keeps what was logged

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """W&B run; mode from WANDB_MODE, offline by default (no network needed; `wandb sync` uploads later)."""

    def __init__(self, cfg: Config, world_size: int):
        import wandb

        tr = cfg.train
        save_dir = tr.wandb_save_dir or os.path.join(tr.tensorboard_dir or ".", "wandb")
        os.makedirs(save_dir, exist_ok=True)
        self.wandb, self.world_size = wandb, world_size
        self.run = wandb.init(project=tr.wandb_project, name=tr.wandb_exp_name, dir=save_dir,
                              mode=os.environ.get("WANDB_MODE", "offline"), config=_flat_config(cfg))

    def record(self, rec: dict) -> None:  # W&B has one step axis: the iteration
        self.run.log({t: v for t, v, s in scalars(rec, self.world_size) if " vs " not in t}, step=rec["iteration"])

    def close(self) -> None:
        self.run.finish()


def _flat_config(cfg: Config) -> dict:
    import dataclasses

    return {f"{section}.{k}": v for section, d in dataclasses.asdict(cfg).items() for k, v in d.items()}


def build_sinks(cfg: Config, rank: int, world_size: int) -> list:
    """The sinks --tensorboard-dir / --wandb-project ask for, on rank 0 (ConfigError when wandb is missing)."""
    tr = cfg.train
    if tr.wandb_project:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("--wandb-project needs the wandb package (pip install wandb); it is not installed")
    if rank != 0:
        return []
    sinks = [TensorBoardSink(tr.tensorboard_dir, world_size)] if tr.tensorboard_dir else []
    return sinks + ([WandbSink(cfg, world_size)] if tr.wandb_project else [])
