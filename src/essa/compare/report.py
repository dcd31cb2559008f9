"""The outputs of `essa compare`: summary.json, comparison.json, the Markdown tables, report.md and
the two plots, all read from the typed summary and results (results.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from essa.compare.results import CompareSummary, EssaResult, GrpoResult, MethodSummary, SftArmResult
from essa.io import atomic_write_json, atomic_write_text
from essa.report import Series, line_plot

REWARD_PLOT = "reward_vs_wallclock.png"
ACCURACY_PLOT = "test_accuracy_vs_wallclock.png"
# The part of summary.json that comparison.json repeats.
COMPARISON_KEYS = ("methods", "time_to_target", "paired_test", "grpo_sweep", "precision")
Curve = tuple[list[float], list[float]]  # (wall-clock s, value)
SFT_ARM = "continued SFT"  # the arm's name in tables and plots


def write_outputs(root: Path, summary: CompareSummary, essa: EssaResult, grpo_runs: list[GrpoResult],
                  sft_arm: SftArmResult | None = None) -> None:
    data = summary.to_json()
    atomic_write_json(root / "summary.json", data)
    atomic_write_json(root / "comparison.json", {key: data[key] for key in COMPARISON_KEYS})
    tables = "\n".join([comparison_table(summary), paired_section(summary), sweep_table(summary)])
    atomic_write_text(root / "comparison.md", tables)
    # The continued SFT has no training reward: it is in the accuracy plot only.
    reward = _lines(summary, f"ESSA (population mean, {summary.essa_decoding})", essa.reward_curve(),
                    [r.reward_curve() for r in grpo_runs], "sampled rollouts")
    _plot(root / REWARD_PLOT, "training reward vs wall-clock", "mean training reward", reward)
    accuracy = _lines(summary, "ESSA (optimizer mean)", essa.test_accuracy_curve(),
                      [r.test_accuracy_curve() for r in grpo_runs], "current adapter", markers=True)
    if sft_arm is not None:
        accuracy.append((*sft_arm.test_accuracy_curve(), {"label": f"{SFT_ARM} (lr {sft_arm.lr:g})", "marker": "o",
                                                          "color": "tab:green"}))
    _plot(root / ACCURACY_PLOT, f"held-out test accuracy vs wall-clock ({summary.test_examples} problems)",
          "test accuracy (greedy)", accuracy)
    atomic_write_text(root / "report.md", _report(summary, tables))


# -- tables ---------------------------------------------------------------------------------------
class Column(NamedTuple):
    """One method's column of the comparison table."""

    name: str
    row: MethodSummary
    time_to_other: float | str | None  # ESSA's time to GRPO's final accuracy and back; "" for the others
    step_size: float  # ESSA's sigma0, a learning rate for the gradient methods


ROWS: list[tuple[str, str, Callable[[Column], Any]]] = [
    ("test accuracy at start", "acc", lambda c: c.row.start_test_accuracy),
    ("final test accuracy", "acc", lambda c: c.row.final_test_accuracy),
    ("  its validation accuracy", "acc", lambda c: c.row.final_val_accuracy),
    ("validation-best test accuracy", "acc", lambda c: c.row.validation_best.test_accuracy),
    ("  its validation accuracy", "acc", lambda c: c.row.validation_best.val_accuracy),
    ("  its wall-clock (s)", "s", lambda c: c.row.validation_best.time_s),
    ("time to the other's final test accuracy (s)", "s", lambda c: c.time_to_other),
    ("step size: ESSA sigma0 / learning rate", "g", lambda c: c.step_size),
    ("generations / optimizer steps", "s", lambda c: c.row.steps),
    ("training wall-clock (s)", "s", lambda c: c.row.wall_clock_s),
    ("stopped by", "s", lambda c: c.row.stopped_by),
    ("peak RSS, load + training (MB)", "MB", lambda c: c.row.peak_rss_mb),
]


def comparison_table(summary: CompareSummary) -> str:
    """ESSA's column, the compared GRPO run's and, where it ran, the continued SFT's."""
    m, ttt = summary.methods, summary.time_to_target
    columns = [Column("ESSA", m.essa, ttt.essa_reaches_grpo_final_s, m.essa.sigma0),
               Column(summary.baseline, m.grpo, ttt.grpo_reaches_essa_final_s, m.grpo.lr)]
    if m.sft_arm is not None:  # time-to-target is ESSA against GRPO only: blank here
        columns.append(Column(SFT_ARM, m.sft_arm, "", m.sft_arm.lr))
    lines = ["| | " + " | ".join(c.name for c in columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {name} | " + " | ".join(_cell(value(c), unit) for c in columns) + " |" for name, unit, value in ROWS]
    lines += ["", "'-' in the time-to-target row: never reached within the budget."]
    return "\n".join(lines) + "\n"


def _cell(v: Any, unit: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return {"acc": f"{v:.3f}", "s": f"{v:.1f}", "MB": f"{v:.0f}", "g": f"{v:.3g}"}[unit]
    return str(v)


def paired_section(summary: CompareSummary) -> str:
    """The paired test-split comparisons in words: each says whether its difference is beyond noise."""
    lines = [f"## Paired comparisons on the {summary.test_examples} test problems", "",
             "Problem by problem: the difference, its paired bootstrap 95% interval and McNemar's exact test on "
             "the problems exactly one of the two solves. An interval that includes 0 is no difference.", ""]
    lines += [f"- {row.text}" for row in summary.paired_test.values()]
    return "\n".join(lines) + "\n"


def sweep_table(summary: CompareSummary) -> str:
    """Every GRPO learning rate tried, so the reader sees how the baseline was tuned."""
    sweep = summary.grpo_sweep
    lines = [f"## {summary.baseline} learning rates", "",
             f"Each from the same start and prompt stream with the full budget. The run compared with ESSA is "
             f"the one with {sweep.selection}.", "",
             "| learning rate | steps | final validation accuracy | final test accuracy | "
             "validation-best: test accuracy (validation, s) | compared |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in sweep.runs:
        best = r.validation_best
        lines.append(f"| {r.lr:g} | {r.steps} | {r.final_val_accuracy:.3f} | {r.final_test_accuracy:.3f} "
                     f"| {best.test_accuracy:.3f} ({best.val_accuracy:.3f}, {best.time_s:.0f}) "
                     f"| {'yes' if r.selected else ''} |")
    return "\n".join(lines) + "\n"


# -- report.md ------------------------------------------------------------------------------------
def _report(summary: CompareSummary, tables: str) -> str:
    return "\n".join([
        f"# ESSA vs {summary.baseline}: {summary.task} on {summary.model}", "", tables,
        f"![training reward vs wall-clock]({REWARD_PLOT})", "",
        f"![held-out test accuracy vs wall-clock]({ACCURACY_PLOT})", "", "## Notes", "",
        *[f"- {n}" for n in _notes(summary)], "",
    ])


def _notes(summary: CompareSummary) -> list[str]:
    m, baseline, precision = summary.methods, summary.baseline, summary.precision
    choice = m.essa.trainer_choice
    notes = [
        f"{'All three' if m.sft_arm is not None else 'Both'} methods start from `{summary.sft_adapter}`"
        + (" with random orthonormal singular vectors (same singular values)"
           if summary.svd_vectors == "random" else "")
        + f"; start tensors identical: {summary.same_start_adapter}.",
        f"Budget {summary.budget_s:.0f} s of training each; matched snapshots at "
        + ", ".join(f"{t:.0f}" for t in summary.checkpoint_times_s) + " s (plus the start and the end).",
        f"ESSA and {baseline} read the same prompt stream (ESSA's mini-batch schedule over the train split), "
        f"every {baseline} learning rate included.",
        f"Precision: ESSA searched in {precision.essa}; {baseline} trained in {precision.grpo}"
        + (f"; the {SFT_ARM} in {precision.sft_arm}" if precision.sft_arm is not None else "")
        + f"; every snapshot was evaluated greedily in {precision.evaluation} by the same evaluator.",
        ("Snapshots are evaluated on the validation and the held-out test split. 'Validation-best' and the "
         f"{baseline} learning rate are chosen on validation accuracy only; the test split never selects anything."),
        f"Time-to-target uses the {baseline} run compared (lr {m.grpo.lr:g}) and snapshot times, so it is "
        "resolved only to the checkpoint spacing.",
        f"ESSA's initial step size sigma0 = {m.essa.sigma0:.3g}"
        + (" (essa.sigma0: auto: chosen by a probe on further train prompts, on ESSA's clock)."
           if summary.essa_sigma0 == "auto" else "."),
        (f"ESSA's own final choice ({choice.choice}, picked on validation): test accuracy "
         f"{choice.test_accuracy:.3f}."),
        "Peak RSS is each method's own process (multiprocessing 'spawn'), read after training."
        if m.essa.peak_rss_mb is not None else "Peak RSS not measured (compare.isolate: false).",
    ]
    if m.sft_arm is not None:
        notes.append(f"The {SFT_ARM} trains the start adapter further with the SFT loss (completion tokens only) "
                     f"on the task's sft split, its own prompts with targets (not the train prompt stream), at a "
                     f"constant learning rate {m.sft_arm.lr:g} (sft.lr), for the same budget and snapshot times. "
                     "It has no training reward, so it is in the accuracy plot only.")
    if summary.sft_wall_clock_s is not None:
        notes.append(f"SFT warm start took {summary.sft_wall_clock_s:.0f} s (not part of any budget).")
    return notes


# -- plots ----------------------------------------------------------------------------------------
def _lines(summary: CompareSummary, essa_label: str, essa: Curve, grpo: list[Curve], what: str,
           markers: bool = False) -> list[Series]:
    """ESSA's curve, then one per GRPO learning rate: the run compared in full colour, the others faint."""
    marker = {"marker": "o" if markers else None}
    out: list[Series] = [(*essa, {"label": essa_label, **marker, "color": "tab:blue"})]
    for run, curve in zip(summary.grpo_sweep.runs, grpo):
        if run.selected:
            style = {"label": f"{summary.baseline} ({what}, lr {run.lr:g})", **marker, "color": "tab:red"}
        else:
            style = {"label": f"{summary.baseline} lr {run.lr:g} (not selected)", **marker, "color": "tab:red",
                     "alpha": 0.3, "linewidth": 1, "zorder": 1}
        out.append((*curve, style))
    return out


def _plot(path: Path, title: str, ylabel: str, lines: list[Series]) -> None:
    line_plot(path, lines, title=title, xlabel="training wall-clock (s)", ylabel=ylabel)
