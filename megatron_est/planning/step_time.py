"""Step-time model for ranking plans: compute at an assumed MFU, communication over stated link bandwidths, the
1F1B pipeline bubble. No overlap of communication with compute is assumed (an upper bound, the same for all
plans, so the ranking is what matters).

Per optimizer step, for each EST stage (its kept heads/neurons/layers: est/stage_flops.py):
  compute   max over pipeline stages of F_s / (TP x DP) / (peak x MFU); F_s = the stage's training FLOPs
            (est/flops.py's count), x 4/3 on layers under full recompute (one more forward), + 1/3 of the
            attention-score FLOPs under selective recompute; x est/balance.slowdown when the sampling strata
            cross TP shards or pipeline stages (the busiest shard and stage set the pace)
  bubble    compute x (m + PP - 1) / m with m micro-batches per rank (1F1B)
  launches  a fixed Cluster.launch_overhead_s per kept layer and micro-batch (forward + backward kernel
            launches and syncs): the MFU is taken as independent of the micro-batch size, so without this
            term the smallest micro-batch would always win on the bubble
  TP        4 all-reduces of the [b, s, h] activations per kept layer and micro-batch (2 forward, 2 backward),
            each 2 (TP-1)/TP x bytes over the intra-node link (TP stays inside a node)
  PP        per micro-batch, one activation forward and one gradient backward of [b, s, h] per stage boundary,
            over the inter-node link when a pipeline stage fills a node or more, else intra-node
  DP        ZeRO-0/1/2: 2 (N-1)/N x P w (all-reduce, or reduce-scatter + all-gather of the updated weights);
            ZeRO-3: 3 (N-1)/N x P w (parameter all-gather in forward and in backward, gradient reduce-scatter);
            over the inter-node link when the data-parallel group leaves the node
  offload   the optimizer partition lives on the host: its fp32 gradients go there and the updated w-byte
            weights come back over PCIe, (4 + w) P / N bytes, and the host's Adam updates P / N parameters at
            Cluster.cpu_adam_params_per_s
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_est.config import Config
from megatron_est.flops_rule import layer_forward_flops_per_token
from megatron_est.est.stage_flops import StageShape, pipeline_stage_flops
from megatron_est.planning.memory import EnginePlan


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    peak_tflops: float = 989.0  # dense bf16 tensor-core peak per GPU (H100 SXM; A100: 312)
    mfu: float = 0.40  # fraction of peak the matmuls reach
    intra_node_gbps: float = 150.0  # GB/s per GPU inside a node (NVLink, bus bandwidth)
    inter_node_gbps: float = 25.0  # GB/s per GPU between nodes (e.g. one 200 Gb/s NIC per GPU)
    pcie_gbps: float = 16.0  # GB/s host <-> GPU (optimizer offload)
    cpu_adam_params_per_s: float = 1.0e9  # host Adam throughput per GPU's share of the CPU
    launch_overhead_s: float = 2.0e-4  # per kept layer and micro-batch, forward + backward

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class StepTime:
    compute: float
    bubble: float
    launches: float
    tp: float
    pp: float
    dp: float
    offload: float

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.launches + self.tp + self.pp + self.dp + self.offload


def _ring(n: int) -> float:
    return 2 * (n - 1) / n if n > 1 else 0.0


def step_time(cfg: Config, shape: StageShape, cl: Cluster, tp: int, pp: int, dp: int, micro_batch: int,
              n_micro: int, e: EnginePlan, rank_params: int, slowdown: float = 1.0) -> StepTime:
    """Seconds per optimizer step of one EST stage (rank_params: the parameters of the largest rank; slowdown:
    est/balance.slowdown, how much strata that cross this layout's shards and stages stretch the compute)."""
    m = cfg.model
    tokens = micro_batch * n_micro * dp * m.seq_length
    per_stage = pipeline_stage_flops(cfg, shape, tokens)
    if e.recompute:  # the extra forward work, on the layers only
        per_layer = layer_forward_flops_per_token(m, shape.n_q, shape.n_kv, shape.n_neurons)
        extra = per_layer if e.recompute == "full" else 4 * shape.n_q * m.seq_length * m.head_dim
        per_stage = [f + extra * tokens * n for f, n in zip(per_stage, shape.layers)]
    rate = cl.peak_tflops * 1e12 * cl.mfu
    compute = slowdown * max(per_stage) / (tp * dp) / rate
    bubble = compute * (pp - 1) / n_micro if pp > 1 else 0.0
    launches = cl.launch_overhead_s * max(shape.layers) * n_micro
    act = micro_batch * m.seq_length * m.hidden_size * e.act_bytes
    intra, inter = cl.intra_node_gbps * 1e9, cl.inter_node_gbps * 1e9
    t_tp = 4 * max(shape.layers) * n_micro * _ring(tp) * act / intra if tp > 1 else 0.0
    pp_link = inter if tp * dp >= cl.gpus_per_node and cl.nodes > 1 else intra
    t_pp = 2 * n_micro * act / pp_link if pp > 1 else 0.0
    dp_link = inter if dp * tp > cl.gpus_per_node else intra
    w = e.weight_bytes
    factor = 1.5 if e.zero_stage == 3 else 1.0
    t_dp = factor * _ring(dp) * rank_params * w / dp_link
    offload = 0.0
    if e.offload_optimizer:
        part = rank_params / dp
        offload = (4 + w) * part / (cl.pcie_gbps * 1e9) + part / cl.cpu_adam_params_per_s
    return StepTime(compute, bubble, launches, t_tp, t_pp, t_dp, offload)
