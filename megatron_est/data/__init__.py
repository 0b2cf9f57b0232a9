"""Data pipeline: tokenizers, Megatron indexed datasets (.bin/.idx), GPT sample indices, blending."""
