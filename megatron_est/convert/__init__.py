"""Conversion between megatron_est state dicts and Hugging Face transformers models."""
