"""Column-major storage of the row-parallel weights, and what must know about it.

EST keeps whole input columns of the row-parallel weights (attention output, MLP fc2). Stored column by column
(strides (1, out)), those columns are contiguous rows of the transpose: gathered and accumulated into .grad as
rows (parallel/sliced_grad.py), several times faster than strided columns. Shapes, values and checkpoints are
those of a row-major weight, and BLAS reads either layout. Elementwise work over whole tensors (AdamW,
data-parallel reduction buffers) runs on the contiguous transpose instead (training/adamw.py, parallel/grads.py);
engines that view parameters as flat bytes (DeepSpeed, apex's FusedAdam) get them row-major.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def column_major_copy(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def column_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()


def contiguous_view(t: torch.Tensor) -> torch.Tensor:
    """t, or its transpose when t is column-major: a contiguous view of the same memory, for elementwise work."""
    return t.t() if column_major(t) else t


def row_major_parameters(module: nn.Module) -> None:
    """Store every parameter row-major (contiguous), for engines that view parameters as flat bytes (DeepSpeed's
    broadcast and ZeRO's flat buffers, apex's multi-tensor kernels). Values, shapes and results stay the same;
    slicing then gathers strided columns."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
