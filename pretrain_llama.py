#!/usr/bin/env python
"""Pretrain a Llama-family model (RoPE, RMSNorm, SwiGLU, GQA) with Evolving Subnetwork Training.

    python pretrain_llama.py                                 # tiny Llama on Shakespeare
    python pretrain_llama.py --model-preset tinyllama-1.1b --data-path ... --tokenizer-model ...
"""
from megatron_est.training.pretrain import main

if __name__ == "__main__":
    main(default_preset="llama-tiny", description="Pretrain Llama with Evolving Subnetwork Training")
