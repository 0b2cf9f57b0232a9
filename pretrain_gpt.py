#!/usr/bin/env python
"""Pretrain GPT-2 with Evolving Subnetwork Training. With no arguments: a small EST run on Shakespeare.

    python pretrain_gpt.py                                   # the default job (tiny GPT-2, 2 CPU cores)
    torchrun --nproc-per-node 2 pretrain_gpt.py --tensor-model-parallel-size 2 ...
"""
from megatron_est.training.pretrain import main

if __name__ == "__main__":
    main(default_preset="gpt2-tiny", description="Pretrain GPT-2 with Evolving Subnetwork Training")
