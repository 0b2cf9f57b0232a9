"""Column-major storage of the row-parallel weights, and what must know about it.

EST keeps whole input columns of the row-parallel weights (attention output, MLP fc2). Stored column by column
(strides (1, out)), those columns are contiguous rows of the transpose: gathered, written back (select and
index_copy below: the sliced forward, freeze's compact optimizer step) and accumulated into .grad
(parallel/sliced_grad.py) as rows, several times faster than strided columns. Shapes, values and checkpoints are
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


def as_rows(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, int, bool]:
    """(t, dim, False), or (t^T, 0, True) when t is column-major and dim = 1: its columns are then contiguous
    rows of t^T, which copy and add several times faster than strided columns (bench/bench_layout.py)."""
    if dim == 1 and column_major(t):
        return t.t(), 0, True
    return t, dim, False


def select(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """t.index_select(dim, index), in t's own layout."""
    v, d, transposed = as_rows(t, dim)
    out = v.index_select(d, index)
    return out.t() if transposed else out


def index_copy(t: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> None:
    """t.index_copy_(dim, index, src), as rows when t is column-major."""
    v, d, transposed = as_rows(t, dim)
    v.index_copy_(d, index, src.t() if transposed else src)
