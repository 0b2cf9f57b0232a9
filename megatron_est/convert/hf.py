"""Map a full (TP-merged) megatron_est state dict to Hugging Face GPT2LMHeadModel / LlamaForCausalLM and back.

Our fused QKV weight is stored per KV group ([ng, r q-heads + k + v, d, h]); Hugging Face keeps GPT-2's
c_attn as [q | k | v] over all heads (Conv1D, transposed) and Llama's q/k/v projections separately.
"""
from __future__ import annotations

import torch

from megatron_est.config import ModelConfig


def hf_config_dict(cfg: ModelConfig) -> dict:
    if cfg.family == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                    n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                    n_head=cfg.num_attention_heads, n_inner=cfg.ffn_hidden_size, activation_function="gelu_new",
                    layer_norm_epsilon=cfg.norm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    tie_word_embeddings=True)
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_query_groups, max_position_embeddings=cfg.max_position_embeddings,
                rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rotary_base, tie_word_embeddings=cfg.tie_embeddings,
                hidden_act="silu", attention_bias=False, mlp_bias=False)


def _split_qkv(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[ng*(r+2)*d, ...] grouped layout -> q [nh*d, ...], k [ng*d, ...], v [ng*d, ...]."""
    ng, r, d = cfg.num_query_groups, cfg.queries_per_group, cfg.head_dim
    g = w.reshape(ng, r + 2, d, *w.shape[1:])
    tail = w.shape[1:]
    return (g[:, :r].reshape(ng * r * d, *tail), g[:, r].reshape(ng * d, *tail), g[:, r + 1].reshape(ng * d, *tail))


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    ng, r, d = cfg.num_query_groups, cfg.queries_per_group, cfg.head_dim
    tail = q.shape[1:]
    parts = [q.reshape(ng, r, d, *tail), k.reshape(ng, 1, d, *tail), v.reshape(ng, 1, d, *tail)]
    return torch.cat(parts, dim=1).reshape(ng * (r + 2) * d, *tail)


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return (_gpt2_to_hf if cfg.family == "gpt2" else _llama_to_hf)(sd, cfg)


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return (_gpt2_from_hf if cfg.family == "gpt2" else _llama_from_hf)(hf, cfg)


def _pad_vocab(w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    pad = cfg.padded_vocab_size - w.shape[0]
    return torch.cat([w, w.new_zeros(pad, *w.shape[1:])]) if pad else w


def _gpt2_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    V = cfg.vocab_size
    out = {"transformer.wte.weight": sd["embedding.weight"][:V],
           "transformer.wpe.weight": sd["position_embedding.weight"],
           "transformer.ln_f.weight": sd["final_norm.weight"], "transformer.ln_f.bias": sd["final_norm.bias"]}
    for i in range(cfg.num_layers):
        p, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
        q, k, v = _split_qkv(sd[p + "attention.qkv.weight"], cfg)
        qb, kb, vb = _split_qkv(sd[p + "attention.qkv.bias"], cfg)
        out.update({
            h + "ln_1.weight": sd[p + "input_norm.weight"], h + "ln_1.bias": sd[p + "input_norm.bias"],
            h + "ln_2.weight": sd[p + "post_attention_norm.weight"],
            h + "ln_2.bias": sd[p + "post_attention_norm.bias"],
            h + "attn.c_attn.weight": torch.cat([q, k, v]).t(), h + "attn.c_attn.bias": torch.cat([qb, kb, vb]),
            h + "attn.c_proj.weight": sd[p + "attention.proj.weight"].t(),
            h + "attn.c_proj.bias": sd[p + "attention.proj.bias"],
            h + "mlp.c_fc.weight": sd[p + "mlp.fc1.weight"].t(), h + "mlp.c_fc.bias": sd[p + "mlp.fc1.bias"],
            h + "mlp.c_proj.weight": sd[p + "mlp.fc2.weight"].t(), h + "mlp.c_proj.bias": sd[p + "mlp.fc2.bias"],
        })
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _gpt2_from_hf(hf: dict, cfg: ModelConfig) -> dict:
    out = {"embedding.weight": _pad_vocab(hf["transformer.wte.weight"], cfg),
           "position_embedding.weight": hf["transformer.wpe.weight"],
           "final_norm.weight": hf["transformer.ln_f.weight"], "final_norm.bias": hf["transformer.ln_f.bias"]}
    H = cfg.hidden_size
    for i in range(cfg.num_layers):
        p, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
        w, b = hf[h + "attn.c_attn.weight"].t(), hf[h + "attn.c_attn.bias"]
        out.update({
            p + "input_norm.weight": hf[h + "ln_1.weight"], p + "input_norm.bias": hf[h + "ln_1.bias"],
            p + "post_attention_norm.weight": hf[h + "ln_2.weight"],
            p + "post_attention_norm.bias": hf[h + "ln_2.bias"],
            p + "attention.qkv.weight": _join_qkv(w[:H], w[H:2 * H], w[2 * H:], cfg),
            p + "attention.qkv.bias": _join_qkv(b[:H], b[H:2 * H], b[2 * H:], cfg),
            p + "attention.proj.weight": hf[h + "attn.c_proj.weight"].t(),
            p + "attention.proj.bias": hf[h + "attn.c_proj.bias"],
            p + "mlp.fc1.weight": hf[h + "mlp.c_fc.weight"].t(), p + "mlp.fc1.bias": hf[h + "mlp.c_fc.bias"],
            p + "mlp.fc2.weight": hf[h + "mlp.c_proj.weight"].t(), p + "mlp.fc2.bias": hf[h + "mlp.c_proj.bias"],
        })
    return {k: v.contiguous() for k, v in out.items()}


_LLAMA_LAYER = {"input_norm.weight": "input_layernorm.weight",
                "post_attention_norm.weight": "post_attention_layernorm.weight",
                "attention.proj.weight": "self_attn.o_proj.weight", "mlp.gate.weight": "mlp.gate_proj.weight",
                "mlp.up.weight": "mlp.up_proj.weight", "mlp.fc2.weight": "mlp.down_proj.weight"}


def _llama_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    V = cfg.vocab_size
    out = {"model.embed_tokens.weight": sd["embedding.weight"][:V], "model.norm.weight": sd["final_norm.weight"]}
    out["lm_head.weight"] = (sd["embedding.weight"] if cfg.tie_embeddings else sd["output_layer.weight"])[:V]
    for i in range(cfg.num_layers):
        p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = _split_qkv(sd[p + "attention.qkv.weight"], cfg)
        out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                    h + "self_attn.v_proj.weight": v})
        out.update({h + theirs: sd[p + ours] for ours, theirs in _LLAMA_LAYER.items()})
    return {k: v.contiguous() for k, v in out.items()}


def _llama_from_hf(hf: dict, cfg: ModelConfig) -> dict:
    out = {"embedding.weight": _pad_vocab(hf["model.embed_tokens.weight"], cfg),
           "final_norm.weight": hf["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = _pad_vocab(hf["lm_head.weight"], cfg)
    for i in range(cfg.num_layers):
        p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[p + "attention.qkv.weight"] = _join_qkv(hf[h + "self_attn.q_proj.weight"],
                                                    hf[h + "self_attn.k_proj.weight"],
                                                    hf[h + "self_attn.v_proj.weight"], cfg)
        out.update({p + ours: hf[h + theirs] for ours, theirs in _LLAMA_LAYER.items()})
    return {k: v.contiguous() for k, v in out.items()}
