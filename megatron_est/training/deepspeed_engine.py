"""DeepSpeed ZeRO (stages 0-3) as the memory engine, with EST. deepspeed is imported only from here.

EST under ZeRO. Every data-parallel rank trains the same subnetwork each step, so all ranks call the same
modules in the same order, which ZeRO-3's parameter gathering needs. Layers outside the subnetwork are not run;
their parameters receive no gradient. ZeRO-1/2 then hand the optimizer zeros for them, like the plain engine.
ZeRO-3 does not: its gradient partitions are persistent buffers that a parameter's gradient overwrites on the
first micro-batch of a step, so a parameter that produced no gradient keeps the partition of the last step it
ran, and the optimizer would apply that stale gradient again. After the last backward of every step we therefore
write zeros into the local gradient partition of each parameter of each skipped layer (DeepSpeed's
safe_set_local_grad), before clipping and the optimizer step. That is communication-free, and the gradient norm
used for clipping no longer counts stale values.

ZeRO-3 prefetch: DeepSpeed records the order in which modules fetch their parameters on the first step and
prefetches along that trace. When the set of layers changes between steps (EST stage 1 samples layers), the
trace no longer matches: DeepSpeed invalidates it and re-records, fetching parameters on demand in that step, so
prefetching only helps in stages that keep every layer (2 and 3). Correctness is unaffected.
"""
from __future__ import annotations

import glob
import math
import os
import tempfile
from typing import Optional

import torch
import torch.distributed as dist

from megatron_est.config import Config, ConfigError
from megatron_est.parallel.grads import grad_norm_and_clip
from megatron_est.parallel.state import ParallelState
from megatron_est.parallel.storage import row_major_parameters
from megatron_est.training import checkpoint_layout as layout, deepspeed_pipeline
from megatron_est.training.checkpoint_layout import est_state_path, iter_dir_name, shard_dir_name
from megatron_est.training import checkpointing, safe_load
from megatron_est.training.checkpointing import load_weights_only, read_shard, write_text_atomic
from megatron_est.training.deepspeed_config import resolve_config, write_derived
from megatron_est.training.deepspeed_unsampled import DeepSpeedFreeze, frozen_during_step, zero_stale_gradients
from megatron_est.training.engine import StepResult
from megatron_est.training.optimizer import step_lr


def import_deepspeed():
    """Import deepspeed with its unused shared-memory comm op disabled (it compiles for a minute at init)."""
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("--deepspeed: DeepSpeed is not installed (pip install deepspeed)") from None
    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (AttributeError, TypeError):
        pass
    return deepspeed


class MPU:
    """The process-group interface DeepSpeed expects (Megatron's mpu), over our ParallelState.

    "Model parallel" is tensor x pipeline: DeepSpeed sums gradient norms over it, counting replicated
    (non-tensor-parallel) parameters on tensor-parallel rank 0 only.
    """

    def __init__(self, st: ParallelState):
        self.st = st
        self.mp_group = st.tp_group
        if st.pp > 1:  # one group per data-parallel rank: all its TP x PP ranks (created by every rank)
            for ranks in st.layout.groups(["tp", "pp"]):
                g = dist.new_group(ranks, timeout=st.timeout)  # ours, not torch's default
                if st.rank in ranks:
                    self.mp_group = g

    def get_model_parallel_rank(self) -> int:
        return self.st.pp_rank * self.st.tp + self.st.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.st.tp * self.st.pp

    def get_model_parallel_group(self):
        return self.mp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.st.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.st.tp

    def get_tensor_model_parallel_group(self):
        return self.st.tp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.st.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.st.pp

    def get_pipeline_model_parallel_group(self):
        return self.st.pp_group

    def get_data_parallel_rank(self) -> int:
        return self.st.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.st.dp

    def get_data_parallel_group(self):
        return self.st.dp_group


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class DeepSpeedEngine:
    """DeepSpeed's engine behind the engine protocol (training/engine.py). `engine` is DeepSpeed's own object: the
    model evaluation and ZeRO-3 gathering go through; `module` is our model inside it."""

    kind = "deepspeed"
    precision = None  # DeepSpeed's half-precision module evaluates as it is; no autocast of ours

    def __init__(self, engine, ds_config: dict, cfg: Config, st: ParallelState):
        self.engine, self.config, self.cfg, self.st = engine, ds_config, cfg, st
        zero = ds_config.get("zero_optimization", {})
        self.stage = int(zero.get("stage", 0))
        self.offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
        self.half = bool((ds_config.get("bf16") or {}).get("enabled") or (ds_config.get("fp16") or {}).get("enabled"))
        self.own_lr = "scheduler" not in ds_config  # our warmup/decay schedule, unless the JSON brings one
        self.freeze: Optional[DeepSpeedFreeze] = None  # --est-unsampled-update freeze (None: adamw)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def model(self):
        return self.engine

    def step(self, batches, sub, step: int, timer=None) -> StepResult:
        return train_step(self, batches, sub, step, timer)

    def metrics(self) -> dict:
        """fp16 loss scale and skipped steps as DeepSpeed counts them (empty otherwise)."""
        engine = self.engine
        if not engine.fp16_enabled():
            return {}
        opt = engine.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(getattr(opt, "loss_scaler", None), "cur_scale", 1.0)
        return {"loss_scale": float(scale), "skipped_iterations": int(engine.skipped_steps)}

    def save(self, tmp_dir: str, name: str, payload: dict) -> None:
        """DeepSpeed's files (engine.save_checkpoint, tag = the iteration directory's name) plus our
        est_state_mp_rank_XX[_YYY].pt beside them; DeepSpeed loss-scales and schedules itself."""
        st = self.st
        self.engine.save_checkpoint(tmp_dir, tag=name, client_state={"megatron_est": True}, save_latest=False)
        if st.dp_rank == 0:
            shard = shard_dir_name(st.tp_rank, st.pp_rank, st.pp)
            checkpointing._save_file(payload, os.path.join(tmp_dir, name, f"est_state_{shard}.pt"))
        _barrier()
        if st.rank == 0:  # DeepSpeed wrote tmp/iter_X/...: make tmp itself the iteration directory
            inner = os.path.join(tmp_dir, name)
            for entry in os.listdir(inner):
                os.replace(os.path.join(inner, entry), os.path.join(tmp_dir, entry))
            os.rmdir(inner)

    def load(self, root: str, iteration: int, meta: dict, load_optimizer: bool) -> dict:
        st = self.st
        if meta.get("weights_only"):  # already loaded into the bare model before the engine existed
            return read_shard(root, iteration, st)[0]
        name = iter_dir_name(iteration)
        path, _ = self.engine.load_checkpoint(root, tag=name, load_optimizer_states=load_optimizer,
                                              load_lr_scheduler_states=load_optimizer,
                                              load_module_only=not load_optimizer)
        if path is None:
            raise ConfigError(f"--load {root}: DeepSpeed could not load {name}")
        return torch.load(est_state_path(root, iteration, st.tp_rank, st.pp_rank, st.pp), map_location="cpu",
                          weights_only=True)

    def published(self, root: str, name: str) -> None:
        """After our latest pointer moved (rank 0): DeepSpeed's own `latest` file, for its tools (zero_to_fp32)."""
        write_text_atomic(os.path.join(root, "latest"), name)

    def close(self) -> None:
        """Before the process group goes: avoids ZeRO-3 aborts at interpreter exit."""
        try:
            self.engine.destroy()
        except Exception:  # noqa: BLE001 (best effort at exit)
            pass


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def initialize(cfg: Config, st: ParallelState, model: torch.nn.Module, log=None,
               resume: Optional[tuple[str, int]] = None) -> DeepSpeedEngine:
    """Wrap this rank's model (a pipeline stage when pp > 1) in a DeepSpeed engine.

    A weights-only checkpoint to start from (an imported Hugging Face model, a re-sharded checkpoint) is loaded
    into the bare model first; DeepSpeed checkpoints load through the engine later (Checkpointer.load).
    """
    deepspeed = import_deepspeed()
    if resume is not None and layout.read_metadata(*resume).get("weights_only"):
        load_weights_only(model, resume[0], resume[1], st)
    ds_config = resolve_config(cfg, st.tp, st.pp, st.dp)
    if st.rank == 0:
        path = write_derived(ds_config, cfg)
        if path and log is not None:
            log.print(f"> DeepSpeed config derived from the flags written to {path}")
    if st.pp > 1:
        ds_config = deepspeed_pipeline.adapt_config(ds_config, st.layout.micro_batches(cfg.train), log)
        deepspeed_pipeline.mark_params_for_norm(model, st)
    else:
        for p in model.parameters():  # DeepSpeed's own marker for tensor-parallel shards (gradient norms)
            if getattr(p, "tensor_parallel", False):
                p.tensor_model_parallel = True
    row_major_parameters(model)  # DeepSpeed broadcasts and flattens parameters as flat bytes
    groups = _param_groups(model, cfg.train.weight_decay)
    tr = cfg.train
    client_opt = None
    if "optimizer" not in ds_config:
        client_opt = torch.optim.AdamW(groups, lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client_opt,
                                           model_parameters=groups if client_opt is None else None,
                                           config=ds_config, mpu=MPU(st), dist_init_required=False)
    run = DeepSpeedEngine(engine, ds_config, cfg, st)
    if cfg.est.unsampled_update == "freeze":
        run.freeze = DeepSpeedFreeze(engine, run.stage, st.dp_rank)
    if run.stage == 3:
        _register_external_params(deepspeed, model)
    if log is not None:
        log.print(f"> DeepSpeed engine: ZeRO stage {run.stage}, "
                  f"{'bf16' if engine.bfloat16_enabled() else 'fp16' if engine.fp16_enabled() else 'fp32'}, "
                  f"{'optimizer from the JSON' if client_opt is None else 'torch AdamW'}"
                  f"{', optimizer state offloaded to CPU' if ds_config['zero_optimization'].get('offload_optimizer') else ''}")
    return run


def _register_external_params(deepspeed, model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters around that module's forward; the tied LM head reads the word
    embedding from the top-level forward, so the embedding is registered there as an external parameter."""
    emb = getattr(model, "embedding", None)
    if emb is not None and getattr(model, "post_process", False) and model.cfg.tie_embeddings:
        deepspeed.zero.register_external_parameter(model, emb.weight)


def train_step(run: DeepSpeedEngine, batches, sub, step: int, timer=None) -> StepResult:
    """One optimizer step through DeepSpeed: engine forward/backward per micro-batch, engine.step() each time
    (DeepSpeed steps the optimizer at the accumulation boundary)."""
    cfg, st = run.cfg, run.st
    engine = run.engine
    module = engine.module
    plan = module.make_plan(sub, st.device)
    if run.own_lr:
        lr = step_lr(cfg, step, sub)
        for g in engine.optimizer.param_groups:
            g["lr"] = lr
    norm0 = None  # the norm we measure where DeepSpeed reports none
    if st.pp > 1:
        loss_sum = deepspeed_pipeline.pipelined_step(run, batches, step, plan, st, timer)
    else:
        n = batches.num_micro
        loss_sum = torch.zeros((), device=st.device)
        for m in range(n):
            tokens = batches.get(step, m).to(st.device, non_blocking=True)
            loss = engine(tokens[:, :-1], tokens[:, 1:], plan).float().mean()
            engine.backward(loss)  # DeepSpeed divides by the accumulation steps and averages over DP
            loss_sum += loss.detach() / n
            if m < n - 1:
                engine.step()  # not yet the accumulation boundary: DeepSpeed only counts the micro-batch
                continue
            zero_stale_gradients(run, module.skipped_parameters(plan))
            if run.stage == 0 and not run.half:  # DeepSpeed reports no norm here: measure it (no clipping)
                norm0 = grad_norm_and_clip([p for p in module.parameters() if p.grad is not None], 0.0,
                                           st.tp_group, st.tp, st.pp_group, st.pp)
                if not math.isfinite(norm0):  # torch AdamW, which DeepSpeed steps here, skips gradient-less ones
                    for p in module.parameters():
                        p.grad = None
            with frozen_during_step(run, module, plan):
                engine.step()
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else (norm0 if norm0 is not None else float("nan"))
    if st.dp > 1:
        dist.all_reduce(loss_sum, group=st.dp_group)
        loss_sum /= st.dp
    loss = float(loss_sum)
    # DeepSpeed 0.19 skips a step whose gradient norm is inf/nan itself (ZeRO 1-3 and its bf16 optimizer; fp16
    # counts it as a loss-scale overflow, a normal event); stage 0 in fp32 is skipped above.
    bad_norm = not math.isfinite(norm) and not run.engine.fp16_enabled()
    return StepResult(loss, norm, nonfinite=bad_norm or not math.isfinite(loss))


# ------------------------------------------------------------------------------------------- conversion
def read_deepspeed_module_states(root: str, iteration: int, tp: int, pp: int) -> dict:
    """{(tp_rank, pp_rank): (fp32 local state dict, parallel info)} of a DeepSpeed checkpoint we wrote.

    Weights come from the ZeRO fp32 partitions (DeepSpeed's zero_to_fp32, one model-parallel rank at a time),
    so bf16 runs export their fp32 master weights and ZeRO-3 checkpoints are reassembled.
    """
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    name = iter_dir_name(iteration)
    it_dir = os.path.join(root, name)
    safe_load.check_deepspeed_checkpoint(it_dir)  # zero_to_fp32 unpickles with weights_only=False
    out = {}
    for p in range(pp):
        for t in range(tp):
            mp = p * tp + t
            extra = torch.load(est_state_path(root, iteration, t, p, pp), map_location="cpu",
                               weights_only=True)
            files = [f for f in glob.glob(os.path.join(it_dir, f"*mp_rank_{mp:02d}_*.pt"))
                     if not os.path.basename(f).startswith("est_state_")]
            if not files:
                raise ConfigError(f"--load {root}: no DeepSpeed files for model-parallel rank {mp} in {it_dir}")
            with tempfile.TemporaryDirectory() as tmp:  # zero_to_fp32 reads one model-parallel rank per folder
                os.makedirs(os.path.join(tmp, name))
                for f in files:
                    os.symlink(os.path.abspath(f), os.path.join(tmp, name, os.path.basename(f).replace(
                        f"mp_rank_{mp:02d}", "mp_rank_00")))
                sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=name)
            out[(t, p)] = ({k: v.float() for k, v in sd.items()}, extra["parallel"])
    return out
