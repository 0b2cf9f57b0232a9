"""Tensor, pipeline and data parallelism on plain torch.distributed (NCCL on GPU, gloo on CPU)."""
