"""An independent reference for EST: run EVERY head, neuron and layer, then zero what was not sampled.

It reads the parameters of an unsharded (TP=1) LanguageModel and shares them, so its gradients land on the same
tensors. Nothing here slices: if the sliced model equals this oracle, slicing is exactly masking plus rescale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_est.est.sampler import Subnetwork
from megatron_est.model.rope import apply_rope, rope_tables


def _norm(cfg, x, w, b):
    if cfg.normalization == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), w, b, cfg.norm_epsilon)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_epsilon) * w


def oracle_loss(model, ids: torch.Tensor, labels: torch.Tensor, sub: Subnetwork) -> torch.Tensor:
    cfg = model.cfg
    P = dict(model.named_parameters())
    nh, ng, r, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.queries_per_group, cfg.head_dim
    b, s = ids.shape
    x = F.embedding(ids, P["embedding.weight"])
    if cfg.position_embedding == "learned":
        x = x + P["position_embedding.weight"][:s]
    cos, sin = rope_tables(d, s, cfg.rotary_base)
    for i in range(cfg.num_layers):
        if i not in sub.layers:
            continue  # identity
        p = f"decoder.layers.{i}."
        get = lambda n: P.get(p + n)  # noqa: E731
        head_mask = torch.zeros(nh)
        head_mask[sub.heads[i] if sub.heads[i] is not None else torch.arange(nh)] = 1.0
        head_scale = nh / head_mask.sum()
        h = _norm(cfg, x, get("input_norm.weight"), get("input_norm.bias"))
        qkv = F.linear(h, get("attention.qkv.weight"), get("attention.qkv.bias")).view(b, s, ng, r + 2, d)
        q = qkv[:, :, :, :r].reshape(b, s, nh, d).transpose(1, 2)
        k = qkv[:, :, :, r].transpose(1, 2).repeat_interleave(r, dim=1)
        v = qkv[:, :, :, r + 1].transpose(1, 2).repeat_interleave(r, dim=1)
        if cfg.position_embedding == "rope":
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att = (q @ k.transpose(-1, -2)) / d ** 0.5
        att = att.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        o = (att @ v) * (head_mask * head_scale).view(1, nh, 1, 1)
        a = F.linear(o.transpose(1, 2).reshape(b, s, nh * d), get("attention.proj.weight"), get("attention.proj.bias"))
        x = x + sub.layer_scale * a
        f = cfg.ffn_hidden_size
        neuron_mask = torch.zeros(f)
        neuron_mask[sub.neurons[i] if sub.neurons[i] is not None else torch.arange(f)] = 1.0
        h = _norm(cfg, x, get("post_attention_norm.weight"), get("post_attention_norm.bias"))
        if cfg.activation == "swiglu":
            hid = F.silu(F.linear(h, get("mlp.gate.weight"))) * F.linear(h, get("mlp.up.weight"))
        else:
            hid = F.gelu(F.linear(h, get("mlp.fc1.weight"), get("mlp.fc1.bias")), approximate="tanh")
        hid = hid * neuron_mask * (f / neuron_mask.sum())
        x = x + sub.layer_scale * F.linear(hid, get("mlp.fc2.weight"), get("mlp.fc2.bias"))
    x = _norm(cfg, x, P["final_norm.weight"], P.get("final_norm.bias"))
    head = P["embedding.weight"] if cfg.tie_embeddings else P["output_layer.weight"]
    logits = F.linear(x, head)
    logits[..., cfg.vocab_size:] = float("-inf")  # padding rows of the vocabulary take no probability
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(b, s)
