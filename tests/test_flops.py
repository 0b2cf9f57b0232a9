"""FLOPs accounting equals a hand computation for a small config."""
import torch

from megatron_est.config import ModelConfig
from megatron_est.est.flops import step_flops
from megatron_est.est.sampler import Subnetwork
from megatron_est.est.schedule import Stage

# h=64, 8 heads of d=8, ffn=256, vocab 250 padded to 256, s=32; 2 layers.
GPT = ModelConfig(family="gpt2", num_layers=2, hidden_size=64, num_attention_heads=8, ffn_hidden_size=256,
                  vocab_size=250, make_vocab_size_divisible_by=64, seq_length=32)
TOKENS = 2 * 32


def test_full_model_by_hand():
    # per token, per layer: qkv 2*64*(3*64)=24576, scores 2*2*8*32*8=8192, proj 2*64*64=8192,
    # mlp 2*2*64*256=65536 -> 106496; LM head 2*64*256=32768; total 2*106496+32768=245760; x3 for training.
    assert step_flops(GPT, TOKENS) == 3 * 245760 * TOKENS == 47_185_920


def test_subnetwork_by_hand():
    # only layer 1 runs, with 4 heads and 128 neurons: qkv 2*64*(3*32)=12288, scores 2*2*4*32*8=4096,
    # proj 2*32*64=4096, mlp 2*2*64*128=32768 -> 53248; plus the LM head 32768 -> 86016 per token.
    sub = Subnetwork(0, Stage(0, 0.5, 0.5, 0.5), (1,), (None, torch.tensor([0, 2, 5, 7])),
                     (None, torch.arange(0, 256, 2)), 1.0)
    assert step_flops(GPT, TOKENS, sub) == 3 * 86016 * TOKENS


def test_gqa_counts_only_the_kv_heads_used():
    # Llama: 8 heads in 2 KV groups, d=8, SwiGLU ffn=96. Keeping heads 0 and 1 (both of group 0) uses one KV
    # head: qkv 2*64*(2+2*1)*8=4096, scores 2*2*2*32*8=2048, proj 2*16*64=2048, mlp 2*3*64*96=36864 -> 45056.
    cfg = ModelConfig(family="llama", num_layers=1, hidden_size=64, num_attention_heads=8, num_query_groups=2,
                      ffn_hidden_size=96, vocab_size=256, make_vocab_size_divisible_by=64, seq_length=32)
    sub = Subnetwork(0, Stage(0, 0.25, 1.0, 1.0), (0,), (torch.tensor([0, 1]),), (None,), 1.0)
    assert step_flops(cfg, 1, sub) == 3 * (45056 + 2 * 64 * 256)
