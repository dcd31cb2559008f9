"""Run reporting: the reward-vs-wall-clock plot and a short Markdown report."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from essa.io import atomic_write_bytes, atomic_write_text


def plot_training(history: list[dict[str, Any]], path: str | Path, title: str = "ESSA") -> Path:
    """Mean and best fitness per generation, and validation accuracy, against wall-clock seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [r for r in history if "fitness_mean" in r]
    vals = [r for r in history if "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if gens:
        t = [r["wall_clock_s"] for r in gens]
        ax.plot(t, [r["fitness_mean"] for r in gens], label="population mean reward", color="tab:blue")
        ax.plot(t, [r["fitness_max"] for r in gens], label="best candidate reward", color="tab:blue",
                alpha=0.45, linestyle="--")
    if vals:
        ax.plot([r["wall_clock_s"] for r in vals], [r["val_accuracy"] for r in vals], marker="o",
                color="tab:orange", label="validation accuracy (optimizer mean)")
    ax.set_xlabel("wall-clock (s)")
    ax.set_ylabel("reward / accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def write_report(path: str | Path, title: str, summary: dict[str, Any], notes: list[str] | None = None,
                 plot: str | None = None) -> Path:
    """A short Markdown report: a key/value table of the run's numbers, the plot, and notes."""
    lines = [f"# {title}", "", "| quantity | value |", "| --- | --- |"]
    for key, value in summary.items():
        lines.append(f"| {key} | {_fmt(value)} |")
    if plot:
        lines += ["", f"![reward vs wall-clock]({plot})"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)
