"""GPT-2 and Llama causal language models (one class; the family is configuration)."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn as nn

from megatron_est.config import ModelConfig
from megatron_est.est.sampler import Subnetwork
from megatron_est.model.norms import Norm
from megatron_est.model.plan import ModelPlan
from megatron_est.model.rope import rope_tables
from megatron_est.model.transformer import TransformerBlock
from megatron_est.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_est.parallel.init import normal_full
from megatron_est.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, parallel_lm_logits
from megatron_est.parallel.mappings import gather_from_tp
from megatron_est.parallel.state import SINGLE, ParallelState


class LanguageModel(nn.Module):
    """Embedding (first stage) -> layers [first, last) -> final norm, LM head and loss (last stage)."""

    def __init__(self, cfg: ModelConfig, st: ParallelState = SINGLE, seed: int = 1234,
                 layer_range: Optional[tuple[int, int]] = None, pre_process: bool = True,
                 post_process: bool = True):
        super().__init__()
        self.cfg, self.st = cfg, st
        self.pre_process, self.post_process = pre_process, post_process
        first, last = layer_range or (0, cfg.num_layers)
        vocab, h, std = cfg.padded_vocab_size, cfg.hidden_size, cfg.init_method_std
        if pre_process or (post_process and cfg.tie_embeddings):
            self.embedding = VocabParallelEmbedding(vocab, h, st, std=std, seed=seed, name="embedding.word")
            if cfg.tie_embeddings and not (pre_process and post_process):
                # Pipelined and tied: the first and last stage each hold a copy (same named seed, so equal);
                # their gradients are summed every step and the last stage's copy is not counted in the norm.
                self.embedding.weight.tied_embedding = True
                self.embedding.weight.pipeline_duplicate = not pre_process
        if pre_process and cfg.position_embedding == "learned":
            self.position_embedding = nn.Embedding(cfg.max_position_embeddings, h)
            with torch.no_grad():
                self.position_embedding.weight.copy_(
                    normal_full((cfg.max_position_embeddings, h), std, seed, "embedding.position"))
        if cfg.position_embedding == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rotary_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.decoder = TransformerBlock(cfg, st, seed, first, last)
        if post_process:
            self.final_norm = Norm(cfg.normalization, h, cfg.norm_epsilon)
            if not cfg.tie_embeddings:
                self.output_layer = ColumnParallelLinear(h, vocab, False, st, std=std, seed=seed,
                                                         name="output_layer")

    def global_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """named_parameters() with global layer indices ("decoder.layers.5..." on any stage holding layer 5)."""
        for name, p in self.named_parameters():
            if name.startswith("decoder.layers."):
                local, rest = name[len("decoder.layers."):].split(".", 1)
                name = f"decoder.layers.{self.decoder.first + int(local)}.{rest}"
            yield name, p

    # ------------------------------------------------------------------------------------------ EST plan
    def make_plan(self, sub: Optional[Subnetwork], device: Optional[torch.device] = None) -> Optional[ModelPlan]:
        """Slicing plan of this rank's layers for a sampled subnetwork (None: the full model)."""
        if sub is None or sub.is_full:
            return None
        first = self.decoder.first
        plans = {}
        for i in sub.layers:
            if first <= i < first + len(self.decoder.layers):
                plans[i] = self.decoder.layers[i - first].make_plan(sub.heads[i], sub.neurons[i])
        plan = ModelPlan(plans, sub.layer_scale)
        return plan if device is None or device.type == "cpu" else _to_device(plan, device)

    def trained_slices(self, plan: Optional[ModelPlan]) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
        """(weight, dim, local indices) for every weight of this stage that the plan slices: the rows or columns
        a step on the plan trains. Weights not listed train whole (or, in skipped layers, not at all)."""
        if plan is None:
            return []
        layers, first = self.decoder.layers, self.decoder.first
        return [s for i, lp in plan.layers.items() for s in layers[i - first].trained_slices(lp)]

    def skipped_parameters(self, plan: Optional[ModelPlan]) -> list[nn.Parameter]:
        """Parameters of this stage's layers that the plan does not run (they get no gradient)."""
        if plan is None:
            return []
        first = self.decoder.first
        return [p for offset, layer in enumerate(self.decoder.layers) if first + offset not in plan.layers
                for p in layer.parameters()]

    # ------------------------------------------------------------------------------------------- forward
    def _rope(self, s: int):
        if self.cfg.position_embedding != "rope":
            return None
        return self.rope_cos[:s], self.rope_sin[:s]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        if self.cfg.position_embedding == "learned":
            x = x + self.position_embedding(torch.arange(ids.shape[1], device=ids.device))
        return x

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary shard of the logits."""
        h = self.final_norm(h)
        weight = self.embedding.weight if self.cfg.tie_embeddings else self.output_layer.weight
        return parallel_lm_logits(h, weight, self.st)

    def forward(self, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None,
                plan: Optional[ModelPlan] = None) -> torch.Tensor:
        """inputs: token ids [b, s] on the first stage, hidden states [b, s, h] otherwise.

        Returns per-token losses [b, s] on the last stage when labels are given, the hidden states on other
        stages, and the full-vocabulary logits when no labels are given.
        """
        x = self.embed(inputs) if self.pre_process else inputs
        x = self.decoder(x, plan, self._rope(x.shape[1]))
        if not self.post_process:
            return x
        logits = self.local_logits(x)
        if labels is None:
            return gather_from_tp(logits, self.st.tp_group)[..., : self.cfg.vocab_size]
        vocab_start = self.st.tp_rank * logits.shape[-1]
        # the padded vocabulary's extra ids take no probability mass, so the loss and the exported (unpadded)
        # Hugging Face model agree exactly
        return vocab_parallel_cross_entropy(logits, labels, self.st.tp_group, self.st.tp, vocab_start,
                                            self.cfg.vocab_size)


def _to_device(plan: ModelPlan, device: torch.device) -> ModelPlan:
    def move(obj):
        if obj is None:
            return None
        for k, v in vars(obj).items():
            if isinstance(v, torch.Tensor):
                setattr(obj, k, v.to(device, non_blocking=True))
        return obj

    for lp in plan.layers.values():
        move(lp.attn)
        move(lp.mlp)
    return plan
