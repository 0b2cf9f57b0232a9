"""Per-rank memory model: model states per engine / ZeRO stage / offload / precision, activations per micro-batch
(with recompute and EST's smaller subnetworks), pipeline in-flight micro-batches and temporary buffers.

All figures are bytes on one rank (its TP shard of its pipeline stage). P = the rank's parameters, N = the
data-parallel size, w = bytes of a compute weight (4 on the plain engine, whose weights stay fp32 under
autocast; 2 for a bf16/fp16 DeepSpeed module, 4 in fp32).

Model states (weights | gradients | optimizer):
  plain torch engine    4P | 4P | 8P (AdamW exp_avg, exp_avg_sq)
  ZeRO-0 (DeepSpeed)    fp32: as plain; bf16: 2P | 2P + 4P (fp32 accumulation) | 12P (fp32 master + moments)
  ZeRO-1                wP | wP | 16P/N (fp32 master 4, moments 8, fp32 gradient partition 4)
  ZeRO-2                wP | wP/N | 16P/N
  ZeRO-3                wP/N + 2 w L (the gathered layer and the prefetched next one) | wP/N | 16P/N
  --offload-optimizer   the optimizer column moves to host memory (ZeRO-2/3 gradients stream there too)
DeepSpeed's estimate_zero2/3_model_states_mem_needs are the bf16 rows of this table with their gradients counted
as 2P+... ("2 + 18/N" bytes per parameter); tests/test_memory.py compares the two.

Activations of one micro-batch (t = micro-batch x sequence tokens), per kept layer, elements per token, with this
rank's kept query width q = n_q d / TP, KV width k = n_kv d / TP, neurons f = n_m / TP (what autograd saves in
model/*.py, counted with saved-tensor hooks while writing this; flash / memory-efficient SDPA keeps no s x s
scores, so core attention costs only its output):
  GPT-2   2h at r bytes (norm inputs) + 2h (norm outputs) + (q + 2k) (fused QKV output, held by the q/k/v views)
          + q (attention output, also the projection's input) + 2f (GELU input and output)
  Llama   4h at 4 bytes (RMSNorm inputs and their normalised fp32 copies) + 2h + (q + 2k) + (q + k) (rotated q,
          k) + q + 4f (gate, up, SiLU(gate), their product) (+ q: a copy of the attention output, with
          grouped queries in bf16/fp16)
  r = 4 on the plain engine (the residual stream stays fp32 under autocast), else m; m = 2 for bf16/fp16 else 4.
Recompute: selective recomputes core attention, which stores nothing extra on these kernels, so it equals none
(on SDPA's math kernel it would drop 2 a s^2 per layer); full keeps r h per kept layer plus one layer's
activations, rebuilt during its backward (--recompute-num-layers N: only the first N layers of a stage).
Last stage: the final norm (2h, Llama 3h) and the log-probabilities 4 V/TP per token (+2 V/TP bf16 logits under
autocast). Pipeline (1F1B): stage i holds min(PP - i, micro-batches) micro-batches' activations at once.
EST: only kept layers, heads and neurons store activations; each kept layer also keeps its index_select'ed
weight slices (kept matmul weights, w bytes; 2 under autocast) for backward; the plain engine's autocast keeps a
2-byte copy of every matmul weight the same way.

Peak = the largest of three phases:
  forward/backward  weights + optimizer + activations + one [t, V/TP] fp32 buffer beside the saved
                    log-probabilities (the logits, or their fp32 copy under autocast, while the loss reads them;
                    the loss's backward then writes its gradient over the saved buffer, parallel/cross_entropy.py)
                    + gradients (all of them with gradient accumulation or, plain engine at DP > 1 with
                    --overlap-grad-reduce, the default, always: they live in one flat buffer for the whole run,
                    parallel/grad_buffer.py; else the LM head's)
                    (+ DeepSpeed's gradient buckets)
  gradient reduce   weights + optimizer + gradients + (plain engine, DP > 1, --no-overlap-grad-reduce) two
                    flattened buckets (the overlapped reduction works in place in its buffer)
  optimizer step    weights + optimizer + gradients (+ under DeepSpeed one fp32 temporary per optimizer element:
                    its client torch AdamW's foreach sqrt of exp_avg_sq; the plain engine's fused AdamW, torch's or
                    apex's, updates in place without one)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_est.config import ModelConfig
from megatron_est.est.stage_flops import StageShape
from megatron_est.planning.params import RankParams

MiB = 2 ** 20
GiB = 2 ** 30
PLAIN_BUCKET_NUMEL = 32 * 1024 * 1024  # parallel/grads.py's flattened all-reduce bucket
DS_REDUCE_BUCKET = int(5e8)  # DeepSpeed's default reduce_bucket_size (elements)


@dataclass(frozen=True)
class EnginePlan:
    """How a rank trains: engine, ZeRO stage, precision, recompute, DeepSpeed buffer sizes."""
    zero_stage: Optional[int] = None  # None: the plain torch engine
    offload_optimizer: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16
    recompute: Optional[str] = None  # None | "selective" | "full"
    recompute_num_layers: Optional[int] = None
    reduce_bucket_size: int = DS_REDUCE_BUCKET
    overlap_comm: bool = False
    overlap_grad_reduce: bool = True  # plain engine: parallel/grad_overlap.py

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage is not None

    @property
    def weight_bytes(self) -> int:
        return 2 if self.deepspeed and self.precision != "fp32" else 4

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision != "fp32" else 4

    @property
    def residual_bytes(self) -> int:
        return 4 if not self.deepspeed else self.act_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one rank. `peak` is on the device; `host` is what --offload-optimizer moves to host memory."""
    weights: float
    gradients: float
    optimizer: float
    activations: float
    temporaries: float  # at the forward/backward peak: loss buffers, head gradient, weight copies, buckets
    step_temporaries: float
    host: float
    peak: float
    peak_phase: str


@dataclass(frozen=True)
class ModelStates:
    weights: float
    gradients: float
    optimizer: float
    host: float


def model_states(p: RankParams, dp: int, e: EnginePlan) -> ModelStates:
    """The table above; P counts the tied embedding's pipeline copy too (it is a real tensor on that rank)."""
    P, N, w = p.total, dp, e.weight_bytes
    if not e.deepspeed or (e.zero_stage == 0 and e.precision == "fp32"):
        return ModelStates(4 * P, 4 * P, 8 * P, 0)
    if e.zero_stage == 0:
        return ModelStates(2 * P, 6 * P, 12 * P, 0)
    opt = 16 * P / N
    if e.zero_stage == 1:
        weights, grads = w * P, w * P
    elif e.zero_stage == 2:
        weights, grads = w * P, (0 if e.offload_optimizer else w * P / N)
    else:
        weights, grads = w * P / N + 2 * w * p.largest_layer, (0 if e.offload_optimizer else w * P / N)
    if e.offload_optimizer:
        return ModelStates(weights, grads, 0, opt)
    return ModelStates(weights, grads, opt, 0)


def _layer_elements(m: ModelConfig, shape: StageShape, tp: int, e: EnginePlan) -> float:
    """Bytes per token that one kept layer saves for backward (no recompute)."""
    h, d = m.hidden_size, m.head_dim
    q, k, f = shape.n_q * d / tp, shape.n_kv * d / tp, shape.n_neurons / tp
    mb, rb = e.act_bytes, e.residual_bytes
    if m.activation == "swiglu":
        # Grouped queries in half precision: CPU's SDPA returns [b, heads, s, d]-contiguous output, so the
        # projection's input is a copy (measured; one more q).
        copy = q if mb == 2 and shape.n_kv < shape.n_q else 0
        return 4 * 4 * h + mb * (2 * h + (q + 2 * k) + (q + k) + q + 4 * f + copy)
    return rb * 2 * h + mb * (2 * h + (q + 2 * k) + q + 2 * f)


def _sliced_weight_params(m: ModelConfig, shape: StageShape, tp: int, with_unsliced: bool) -> float:
    """Matmul weights of one kept layer that index_select copies for the step (only the sampled modules, or
    every matmul weight with with_unsliced: autocast copies those too)."""
    h, d = m.hidden_size, m.head_dim
    q, k, f = shape.n_q * d / tp, shape.n_kv * d / tp, shape.n_neurons / tp
    attn = h * (q + 2 * k) + q * h if with_unsliced or shape.n_q < m.num_attention_heads else 0
    mlp = (3 if m.activation == "swiglu" else 2) * h * f
    return attn + (mlp if with_unsliced or shape.n_neurons < m.ffn_hidden_size else 0)


def activations_per_microbatch(m: ModelConfig, shape: StageShape, tp: int, pp_rank: int, pp: int, tokens: int,
                               e: EnginePlan) -> float:
    """Activation bytes one micro-batch keeps on pipeline stage pp_rank until its backward."""
    layers = shape.layers[pp_rank]
    per_layer = _layer_elements(m, shape, tp, e) * tokens
    if e.recompute == "full":
        n_full = layers if e.recompute_num_layers is None else min(layers, e.recompute_num_layers)
        act = n_full * e.residual_bytes * m.hidden_size * tokens + (layers - n_full) * per_layer
        act += per_layer if n_full else 0  # the layer being recomputed during its backward
    else:
        act = layers * per_layer
    if pp_rank == pp - 1:
        norm = (3 if m.normalization == "rmsnorm" else 2) * m.hidden_size * 4
        vocab = m.padded_vocab_size / tp
        act += tokens * (norm + vocab * (4 + (2 if e.act_bytes == 2 else 0)))
    return act


def in_flight_microbatches(pp_rank: int, pp: int, n_micro: int) -> int:
    """1F1B: stage i runs PP - i forwards before its first backward (all of them when fewer micro-batches)."""
    return min(pp - pp_rank, n_micro) if pp > 1 else 1


def _forward_temporaries(m: ModelConfig, p: RankParams, shape: StageShape, tp: int, pp: int, tokens: int,
                         n_micro: int, e: EnginePlan) -> float:
    """Bytes beside the saved activations at the forward/backward peak: the logits beside the loss's saved
    log-probabilities, the LM head's gradient (single micro-batch), weight copies (autocast; EST slices)."""
    temp = 0.0
    if p.pp_rank == pp - 1:  # the fp32 logits beside the log-probabilities the loss saves
        temp += 4 * tokens * m.padded_vocab_size / tp
        head = p.lm_head or p.embedding  # tied without PP: the embedding is the head
        temp += (4 if not e.deepspeed else e.weight_bytes) * head if n_micro == 1 else 0
    layers = shape.layers[p.pp_rank]
    if not e.deepspeed and e.precision != "fp32":  # autocast's half-precision copies of every matmul weight run
        return temp + 2 * layers * _sliced_weight_params(m, shape, tp, with_unsliced=True)
    return temp + e.weight_bytes * layers * _sliced_weight_params(m, shape, tp, with_unsliced=False)


def _deepspeed_buckets(p: RankParams, e: EnginePlan) -> float:
    """ZeRO-1/2's contiguous gradient bucket(s): reduce_bucket_size elements of the gradients' dtype (the
    module's: DeepSpeed's grad_accum_dtype defaults to it), doubled with overlap_comm; never more than the rank's
    gradients fill."""
    if not (e.deepspeed and e.zero_stage in (1, 2)):
        return 0.0
    return (2 if e.overlap_comm else 1) * min(e.reduce_bucket_size, p.total) * e.weight_bytes


def _plain_reduce_buffers(p: RankParams, e: EnginePlan) -> float:
    """The plain engine's synchronous DP all-reduce (parallel/grads.py, fp32 gradients): one flattened bucket at a
    time and its unflattened copy. The overlapped one reduces slices of its gradient buffer in place: none."""
    return 0.0 if e.overlap_grad_reduce else 2 * 4 * min(PLAIN_BUCKET_NUMEL, p.total)


def estimate(m: ModelConfig, p: RankParams, shape: StageShape, tp: int, pp: int, dp: int, micro_batch: int,
             n_micro: int, e: EnginePlan) -> MemoryEstimate:
    """Peak bytes of one rank: the largest of the three phases of the module docstring."""
    s = model_states(p, dp, e)
    tokens = micro_batch * m.seq_length
    act = activations_per_microbatch(m, shape, tp, p.pp_rank, pp, tokens, e) * \
        in_flight_microbatches(p.pp_rank, pp, n_micro)
    temp = _forward_temporaries(m, p, shape, tp, pp, tokens, n_micro, e)
    buckets = _deepspeed_buckets(p, e)
    # Gradient accumulation: every micro-batch after the first runs with all gradients allocated; so does every
    # micro-batch when they live in the overlapped reduction's flat buffer.
    grads_held = n_micro > 1 or (not e.deepspeed and dp > 1 and e.overlap_grad_reduce)
    fwd_bwd = s.weights + s.optimizer + act + temp + buckets + (s.gradients if grads_held else 0)
    reduce = s.weights + s.optimizer + s.gradients + buckets
    if not e.deepspeed and dp > 1:
        reduce += _plain_reduce_buffers(p, e)
    # DeepSpeed's client AdamW (foreach on GPU; ZeRO's one flat partition on CPU): a sqrt(exp_avg_sq) temporary of
    # every element it updates (on the host when offloaded). training/optimizer.py's fused AdamW has none.
    step_temp = 0.0 if e.offload_optimizer or not e.deepspeed else 4 * p.total / (dp if e.zero_stage else 1)
    step = s.weights + s.optimizer + s.gradients + step_temp + buckets
    phases = {"forward/backward": fwd_bwd, "gradient reduce": reduce, "optimizer step": step}
    phase = max(phases, key=phases.get)
    return MemoryEstimate(s.weights, s.gradients, s.optimizer, act, temp + buckets, step_temp, s.host,
                          phases[phase], phase)


def engine_plan(cfg) -> EnginePlan:
    """The EnginePlan of a resolved Config (validation.validate(...).config has a DeepSpeed JSON's stage and
    precision written in; the JSON's bucket size, overlap and offload keys are read here)."""
    import json

    e = cfg.engine
    stage = offload = None
    bucket, overlap = DS_REDUCE_BUCKET, False
    if e.deepspeed:
        stage = 1 if e.zero_stage is None else e.zero_stage
        zero = {}
        if e.deepspeed_config:
            with open(e.deepspeed_config) as f:
                zero = json.load(f).get("zero_optimization") or {}
        bucket = int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET))
        overlap = bool(zero.get("overlap_comm", stage == 3))
        offload = e.offload_optimizer or (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    return EnginePlan(stage, bool(offload), e.precision, e.recompute_granularity, e.recompute_num_layers,
                      bucket, overlap, e.overlap_grad_reduce)
