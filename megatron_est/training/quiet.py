"""Quiet by default: rank 0 prints one line per logged iteration and nothing repeats per step or per rank.

Third-party messages that would (torch's deprecation warnings from inside DeepSpeed's ZeRO-3 collectives, two
per rank per step; DeepSpeed's accelerator notice, one per rank) are filtered once at start-up; --verbose lets
them all through.
"""
from __future__ import annotations

import os
import warnings

import torch

# Deprecations torch raises from code we do not own (DeepSpeed calls these collectives every ZeRO-3 step).
_REPEATING = (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",)


def quiet_third_party(verbose: bool) -> None:
    if verbose:
        return
    for message in _REPEATING:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    if not torch.cuda.is_available():  # said, else DeepSpeed warns on every rank that it fell back to the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
