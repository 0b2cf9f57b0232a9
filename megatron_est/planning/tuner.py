"""Search DeepSpeed plans (ZeRO stage, TP, PP, micro-batch, recompute, offload) for a cluster: drop those that
training refuses (validation.validate) or that do not fit in GPU memory (planning/memory.py, every EST stage and
pipeline stage), rank the rest by the estimated time to train the whole schedule (planning/step_time.py)."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from megatron_est.config import Config, ConfigError
from megatron_est.validation import validate
from megatron_est.est.balance import slowdown, worst_shape
from megatron_est.est.build import build_sampler
from megatron_est.est.stage_flops import closed_form_flops, stage_shape
from megatron_est.parallel.layout import Layout
from megatron_est.planning.memory import GiB, EnginePlan, estimate
from megatron_est.planning.params import rank_params
from megatron_est.planning.step_time import Cluster, StepTime, step_time

BUCKET = 50_000_000  # reduce/all-gather bucket (elements) the emitted JSON sets: DeepSpeed's 5e8 costs 2 GB
RECOMPUTE = (None, "selective", "full")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Candidate:
    zero_stage: int
    tp: int
    pp: int
    micro_batch: int
    recompute: Optional[str]
    offload: bool

    def engine(self, precision: str) -> EnginePlan:
        return EnginePlan(self.zero_stage, self.offload, precision, self.recompute, None, BUCKET,
                          overlap_comm=self.zero_stage >= 2)


@dataclass(frozen=True)
class Evaluated:
    cand: Candidate
    dp: int
    n_micro: int
    peak: float  # bytes: the largest over EST stages and pipeline stages
    host: float  # bytes of host memory per GPU (optimizer offload)
    free: float  # GPU memory minus peak
    fits: bool
    full_step: StepTime  # the full model's step (the schedule's last stage)
    train_time: float  # seconds for --train-iters under the EST schedule
    measured_step: Optional[float] = None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: Config, cl: Cluster) -> Iterator[Candidate]:
    """TP within a node, PP over the layers; every micro-batch dividing the per-rank batch; all ZeRO stages."""
    gbs = cfg.train.global_batch_size
    for tp in _divisors(cl.gpus_per_node):
        for pp in _divisors(cfg.model.num_layers):
            try:
                dp = Layout.of(cl.world, tp, pp).dp
            except ConfigError:  # the world does not split into this TP x PP
                continue
            if gbs % dp:
                continue
            for mbs in _divisors(gbs // dp):
                for zero in ZERO_STAGES:
                    for rc in RECOMPUTE:
                        for off in ((False, True) if zero else (False,)):
                            yield Candidate(zero, tp, pp, mbs, rc, off)


def candidate_config(base: Config, c: Candidate, world: int) -> Config:
    e = dataclasses.replace(base.engine, deepspeed=True, deepspeed_config=None, zero_stage=c.zero_stage,
                            offload_optimizer=c.offload, recompute_granularity=c.recompute,
                            recompute_activations=False, recompute_num_layers=None)
    par = dataclasses.replace(base.parallel, tensor_model_parallel_size=c.tp, pipeline_model_parallel_size=c.pp,
                              world_size=world, decoder_first_pipeline_num_layers=None,
                              decoder_last_pipeline_num_layers=None)
    return dataclasses.replace(base, engine=e, parallel=par, train=dataclasses.replace(
        base.train, micro_batch_size=c.micro_batch))


def evaluate(base: Config, c: Candidate, cl: Cluster, margin: float,
             slowdowns: Optional[dict] = None) -> Optional[Evaluated]:
    """None when training would refuse the plan; else its memory and time (fits: at least `margin` of the GPU
    memory left free for the CUDA context, NCCL and fragmentation). slowdowns caches est/balance.slowdown per
    (TP, PP, EST stage): it draws subnetworks, and every micro-batch, ZeRO and recompute choice shares it."""
    cfg = candidate_config(base, c, cl.world)
    slowdowns = {} if slowdowns is None else slowdowns
    try:
        validate(cfg, cl.world)
    except ConfigError:
        return None
    dp = cl.world // (c.tp * c.pp)
    n_micro = cfg.train.global_batch_size // (c.micro_batch * dp)
    sampler = build_sampler(cfg)
    e = c.engine(cfg.engine.precision)
    ranks = [rank_params(cfg, 0, p) for p in range(c.pp)]
    biggest = max(r.total for r in ranks)
    peak = host = 0.0
    train_time, full = 0.0, None
    for st in closed_form_flops(cfg, sampler, cfg.train.train_iters, 1):
        rates = sampler.schedule.stages[st.stage - 1]
        shape, most = stage_shape(cfg, sampler, rates), worst_shape(cfg, sampler, rates)
        for r in ranks:
            mem = estimate(cfg.model, r, most, c.tp, c.pp, dp, c.micro_batch, n_micro, e)
            peak, host = max(peak, mem.peak), max(host, mem.host)
        key = (c.tp, c.pp, st.stage)
        if key not in slowdowns:
            slowdowns[key] = slowdown(cfg, sampler, rates)
        t = step_time(cfg, shape, cl, c.tp, c.pp, dp, c.micro_batch, n_micro, e, biggest, slowdowns[key])
        train_time += t.total * st.iterations
        full = t
    gpu = cl.gpu_memory_gib * GiB
    return Evaluated(c, dp, n_micro, peak, host, gpu - peak, gpu - peak >= margin * gpu, full, train_time)


def search(base: Config, cl: Cluster, margin: float,
           progress: Optional[Callable[[int, int], None]] = None) -> tuple[list[Evaluated], list[Evaluated], int]:
    """(fitting plans fastest first, plans that do not fit, number refused by validation)."""
    cands = list(candidates(base, cl))
    fit, too_big, refused, slowdowns = [], [], 0, {}
    for i, c in enumerate(cands):
        ev = evaluate(base, c, cl, margin, slowdowns)
        if ev is None:
            refused += 1
        else:
            (fit if ev.fits else too_big).append(ev)
        if progress:
            progress(i + 1, len(cands))
    fit.sort(key=lambda ev: (ev.train_time, -ev.free))
    return fit, too_big, refused


def progress_bar(done: int, total: int, width: int = 40) -> None:
    """A one-line bar on stderr, redrawn in place (only for searches large enough to wait for)."""
    if total < 200 or (done % 25 and done != total):
        return
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} plans")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def deepspeed_json(cfg: Config, ev: Evaluated, precision: str) -> dict:
    """The DeepSpeed config of a plan, complete (no "auto"), as training/deepspeed_config.py checks it."""
    c = ev.cand
    zero = {"stage": c.zero_stage, "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET,
            "overlap_comm": c.zero_stage >= 2, "contiguous_gradients": True}
    if c.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=BUCKET, stage3_param_persistence_threshold=100_000)
    if c.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    conf = {"train_batch_size": cfg.train.global_batch_size, "train_micro_batch_size_per_gpu": c.micro_batch,
            "gradient_accumulation_steps": ev.n_micro, "gradient_clipping": cfg.train.clip_grad,
            "zero_optimization": zero, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    if precision in ("bf16", "fp16"):
        conf[precision] = {"enabled": True}
    return conf


def plan_flags(cfg: Config, ev: Evaluated, json_path: str) -> list[str]:
    c = ev.cand
    flags = ["--tensor-model-parallel-size", str(c.tp), "--pipeline-model-parallel-size", str(c.pp),
             "--micro-batch-size", str(c.micro_batch), "--global-batch-size", str(cfg.train.global_batch_size),
             "--deepspeed_config", json_path]
    return flags + (["--recompute-granularity", c.recompute] if c.recompute else [])


def sbatch_env(cl: Cluster, cfg: Config, ev: Evaluated, json_path: str) -> str:
    """Variables examples/slurm/*.sbatch read (source it, then sbatch --nodes NODES ...)."""
    c = ev.cand
    extra = f"--recompute-granularity {c.recompute}" if c.recompute else ""
    return "\n".join([f"export NODES={cl.nodes}", f"export GPUS_PER_NODE={cl.gpus_per_node}", f"export TP={c.tp}",
                      f"export PP={c.pp}", f"export MICRO_BATCH={c.micro_batch}",
                      f"export GLOBAL_BATCH={cfg.train.global_batch_size}", f"export DS_CONFIG={json_path}",
                      f'export EXTRA_ARGS="{extra}"']) + "\n"


def describe(c: Candidate) -> str:
    return (f"ZeRO-{c.zero_stage}{' + offload' if c.offload else ''}, TP {c.tp}, PP {c.pp}, micro-batch "
            f"{c.micro_batch}, recompute {c.recompute or 'off'}")


def explain(best: Evaluated, fit: list[Evaluated], too_big: list[Evaluated], refused: int, cl: Cluster) -> str:
    """One paragraph: what was chosen, why, and what the alternatives cost."""
    c, t = best.cand, best.full_step
    parts = [f"Chosen: {describe(c)} (DP {best.dp}, {best.n_micro} micro-batches per step). Its peak is "
             f"{best.peak / GiB:.1f} of {cl.gpu_memory_gib:g} GiB per GPU ({best.free / GiB:.1f} GiB free), and it "
             f"has the shortest estimated time to train, {best.train_time / 3600:.2f} h; a full-model step takes "
             f"{t.total:.3f} s: compute {t.compute:.3f}, pipeline bubble {t.bubble:.3f}, launches {t.launches:.3f}, TP {t.tp:.3f}, PP "
             f"{t.pp:.3f}, data-parallel/ZeRO {t.dp:.3f}, offload {t.offload:.3f}."]
    if len(fit) > 1:
        r = fit[1]
        parts.append(f"The runner-up, {describe(r.cand)}, needs {r.train_time / 3600:.2f} h "
                     f"({100 * (r.train_time / best.train_time - 1):+.1f}%)"
                     + (f"; on equal time the plan with more free memory wins ({r.free / GiB:.1f} GiB free)."
                        if r.train_time == best.train_time else "."))
    if c.recompute is None and any(ev.cand.recompute for ev in fit):
        parts.append("Recompute is off because the plan fits without it, and recompute only adds compute.")
    parts.append(f"{len(fit)} plans fit, {len(too_big)} do not fit the memory with the margin, "
                 f"{refused} are layouts training refuses.")
    return " ".join(parts)
