"""Run reporting: the reward-vs-wall-clock plot and a short Markdown report."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from essa.io import atomic_write_bytes, atomic_write_text

# One line of a plot: x values, y values, and matplotlib style keywords (label, color, ...).
Series = tuple[list[float], list[float], dict[str, Any]]


def plot_training(history: list[dict[str, Any]], path: str | Path, title: str = "ESSA") -> Path:
    """Mean and best fitness per generation, and validation accuracy, against wall-clock seconds."""
    gens = [r for r in history if "fitness_mean" in r]
    vals = [r for r in history if "val_accuracy" in r]
    series: list[Series] = []
    if gens:
        t = [r["wall_clock_s"] for r in gens]
        series.append((t, [r["fitness_mean"] for r in gens],
                       {"label": "population mean reward", "color": "tab:blue"}))
        series.append((t, [r["fitness_max"] for r in gens],
                       {"label": "best candidate reward", "color": "tab:blue", "alpha": 0.45,
                        "linestyle": "--"}))
    if vals:
        series.append(([r["wall_clock_s"] for r in vals], [r["val_accuracy"] for r in vals],
                       {"marker": "o", "color": "tab:orange",
                        "label": "validation accuracy (optimizer mean)"}))
    return line_plot(path, series, title=title, xlabel="wall-clock (s)", ylabel="reward / accuracy")


def line_plot(path: str | Path, series: list[Series], title: str, xlabel: str,
              ylabel: str) -> Path:
    """One PNG of lines, each (xs, ys, matplotlib style such as label and color), with a grid
    and a legend, written atomically to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for xs, ys, style in series:
        ax.plot(xs, ys, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG to `path` atomically, then close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def write_report(path: str | Path, title: str, summary: dict[str, Any], notes: list[str] | None = None,
                 plot: str | None = None, sections: list[tuple[str, str]] | None = None) -> Path:
    """A short Markdown report: a key/value table of the run's numbers, the plot, notes, and any
    further (heading, Markdown body) sections."""
    lines = [f"# {title}", "", "| quantity | value |", "| --- | --- |"]
    for key, value in summary.items():
        lines.append(f"| {key} | {_fmt(value)} |")
    if plot:
        lines += ["", f"![reward vs wall-clock]({plot})"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    for heading, body in sections or []:
        lines += ["", f"## {heading}", "", body.rstrip()]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)
