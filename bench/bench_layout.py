"""Row-major against column-major storage of the row-parallel weights (parallel/storage.py), side by side in one
process, interleaved round by round:

- EST's per-weight work on an MLP fc2 weight [hidden, ffn] with half its input columns kept: the gather
  (parallel/storage.select) and the gradient accumulation (index_add_ into .grad);
- one AdamW step over a whole model's parameters: torch's fused AdamW on row-major parameters, on column-major
  ones directly, and through training/adamw.py (the contiguous transposes).

    OMP_NUM_THREADS=1 python bench/bench_layout.py               # GPT-2 124M shapes
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from bench.common import interleaved_times, median  # noqa: E402
from megatron_est.config import TrainConfig, model_preset  # noqa: E402
from megatron_est.host_memory import keep_freed_memory  # noqa: E402
from megatron_est.model.language_model import LanguageModel  # noqa: E402
from megatron_est.parallel.storage import column_major_copy, select  # noqa: E402
from megatron_est.training.adamw import AdamW  # noqa: E402
from megatron_est.training.optimizer import param_groups  # noqa: E402


def _rounds(variants: dict, reps: int) -> dict:
    """Median seconds per variant, interleaved round by round after one warm-up round."""
    return {k: median(v) for k, v in interleaved_times(variants, reps).items()}


def _slicing(hidden: int, ffn: int, reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    row = torch.randn(hidden, ffn, generator=g)
    col = column_major_copy(row)
    kept = torch.randperm(ffn, generator=g)[: ffn // 2].sort().values
    grad = torch.randn(hidden, len(kept), generator=g)
    grad_col = column_major_copy(grad)  # how autograd hands a column-major slice its gradient
    buf_row, buf_col = torch.zeros_like(row), torch.zeros_like(col)
    t = _rounds({"gather row-major": lambda: select(row, 1, kept),
                 "gather column-major": lambda: select(col, 1, kept),
                 "accumulate row-major": lambda: buf_row.index_add_(1, kept, grad),
                 "accumulate column-major": lambda: buf_col.t().index_add_(0, kept, grad_col.t())}, reps)
    print(f"| fc2 [{hidden}, {ffn}], half the columns | row-major ms | column-major ms | column / row |")
    print("|---|---|---|---|")
    for what in ("gather", "accumulate"):
        a, b = t[f"{what} row-major"], t[f"{what} column-major"]
        print(f"| {what} | {1e3 * a:.2f} | {1e3 * b:.2f} | {b / a:.3f} |")


def _adamw(preset: str, reps: int) -> None:
    tr = TrainConfig()
    variants = {}
    for name, layout, cls in (("row-major, torch AdamW", "row", torch.optim.AdamW),
                              ("column-major, torch AdamW", "col", torch.optim.AdamW),
                              ("column-major, training/adamw.py", "col", AdamW)):
        model = LanguageModel(model_preset(preset), seed=0)
        with torch.no_grad():
            for p in model.parameters():
                if layout == "row":
                    p.data = p.data.contiguous()
                p.grad = torch.randn_like(p) * 1e-3  # in the parameter's layout, as the backward leaves it
        opt = cls(param_groups(model, tr), lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps,
                  fused=True)
        variants[name] = opt.step
    t = _rounds(variants, reps)
    base = t["row-major, torch AdamW"]
    print(f"| AdamW step, {preset} | ms | / row-major |")
    print("|---|---|---|")
    for name, v in t.items():
        print(f"| {name} | {1e3 * v:.1f} | {v / base:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# host memory: {keep_freed_memory(True, 'cpu')}; {args.threads} thread(s), {args.reps} rounds")
    cfg = model_preset(args.preset)
    _slicing(cfg.hidden_size, cfg.ffn_hidden_size, 10 * args.reps)
    _adamw(args.preset, args.reps)


if __name__ == "__main__":
    main()
