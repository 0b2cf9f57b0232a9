"""Validation loss against training FLOPs and against training wall-clock, one line per run."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_est.study.report import RunResult  # noqa: E402

COLORS = {"baseline": "tab:blue", "est": "tab:red", "control": "tab:green"}
OTHERS = ["tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "black"]


def _color(method: str, others: dict[str, str]) -> str:
    if method in COLORS:
        return COLORS[method]
    if method.startswith("control"):
        return COLORS["control"]
    return others.setdefault(method, OTHERS[len(others) % len(OTHERS)])


def plot_curves(results: list[RunResult], path: str, x: str, title: str) -> None:
    """x: "flops" or "time"."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen, others = set(), {}
    for r in results:
        xs = [f for f, _, _ in r.val_curve] if x == "flops" else [t for _, t, _ in r.val_curve]
        ys = [loss for _, _, loss in r.val_curve]
        label = r.method if r.method not in seen else None
        seen.add(r.method)
        ax.plot(xs, ys, color=_color(r.method, others), alpha=0.8, lw=1.2, label=label, marker=".")
    ax.set_xlabel("training FLOPs" if x == "flops" else "training wall-clock (s)")
    ax.set_ylabel("validation loss (full model)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
