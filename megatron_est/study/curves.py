"""Loss curves of a metrics file (--metrics-file JSON lines) against iterations, tokens, training FLOPs and
training wall-clock, and one figure for several runs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AXES = {"iterations": "iterations", "tokens": "tokens", "flops": "training FLOPs",
        "time": "training wall-clock (s)"}


@dataclass
class Curves:
    """Per logged point: the four x axes and the loss. Wall-clock counts training steps only (the logged mean
    step time of each interval times its iterations), not evaluation or set-up."""
    train: dict = field(default_factory=lambda: {k: [] for k in (*AXES, "loss")})
    val: dict = field(default_factory=lambda: {k: [] for k in (*AXES, "loss")})


def read_curves(path: str) -> Curves:
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    c, t, last_it, tokens_per_it = Curves(), 0.0, 0, 0
    for r in recs:
        if "lm_loss" in r:
            t += r["interval_time_s"] * (r["iteration"] - last_it)
            last_it, tokens_per_it = r["iteration"], r["tokens"] / r["iteration"]
            _add(c.train, r["iteration"], r["tokens"], r["cumulative_flops"], t, r["lm_loss"])
        if "val_loss" in r and c.train["loss"]:  # logged right after the training record of its iteration
            _add(c.val, r["iteration"], r["iteration"] * tokens_per_it, r["cumulative_flops"], t, r["val_loss"])
    if not c.train["loss"]:
        raise ValueError("no training loss recorded (not a --metrics-file?)")
    return c


def _add(series: dict, it, tokens, flops, t, loss) -> None:
    for key, v in zip((*AXES, "loss"), (it, tokens, flops, t, loss)):
        series[key].append(v)


def plot_runs(runs: dict[str, Curves], path: str, axes: tuple[str, ...] = tuple(AXES), title: str = "") -> None:
    """One panel per x axis; per run the training loss (thin line) and the validation loss (dots)."""
    fig, panels = plt.subplots(1, len(axes), figsize=(4.2 * len(axes), 3.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, x in zip(panels[0], axes):
        for i, (name, c) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            ax.plot(c.train[x], c.train["loss"], color=color, lw=0.8, alpha=0.6, label=f"{name} train")
            if c.val["loss"]:
                ax.plot(c.val[x], c.val["loss"], color=color, lw=1.4, marker=".", label=f"{name} validation")
        ax.set_xlabel(AXES[x])
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    panels[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
