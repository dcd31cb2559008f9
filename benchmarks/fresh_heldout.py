"""Adapters scored against a start on more held-out problems than a config's test split.

Builds up to `--size` problems disjoint by problem key (`essa.tasks.splits.problem_key`:
arithmetic's operation and operands, the IFEval-like task's prompt) from all four splits of the
config's task: its test stream drawn on past `test_size`, every key of the config's splits
removed. Works for the tasks whose splits are generated streams (arithmetic, ifeval without
`eval_file`, math and gsm8k procedural). Each adapter is scored greedily on them and compared with
`--start` (paired delta, bootstrap 95% CI, McNemar p). One JSON line.

Each adapter's delta is also given per stratum (arithmetic's operation, the IFEval-like task's
number of instructions) and reweighted to the test split's mix of strata (`delta_at_test_mix`,
bootstrap within strata). `--with-test` scores the test split too, broken down the same way.

Where a problem space is small, the fresh problems are the generator's leftovers, not a sample
from the same distribution as the test split: easy arithmetic has about 1,100 keys per kind, so
where the splits take most of them the leftovers skew towards the keys drawn least often (for
subtraction, the larger first operands); IFEval-like prompts with one instruction are few, so the
leftovers are mostly two-instruction prompts: `delta_at_test_mix` corrects for the mix, not for
what else the leftovers differ in.

    python benchmarks/fresh_heldout.py --config src/essa/configs/demo.yaml \\
        --start runs/demo/sft/adapter essa=runs/demo/adapter grpo=runs/cmp/grpo/lr_0.0003/snapshots/step00005
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from typing import Any

import numpy as np

from _common import json_main, log

from essa.commands import evaluation_kind, load_inputs, paired_fields, score_adapter
from essa.config import load_config
from essa.errors import EssaError
from essa.io import atomic_write_jsonl, ensure_writable_dir
from essa.stats import compare_paired, stratified_delta
from essa.tasks import get_task
from essa.tasks.base import SPLITS
from essa.tasks.splits import problem_key


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's config")
    parser.add_argument("--start", required=True, help="the adapter the others are compared with")
    parser.add_argument("--size", type=int, default=2000, help="at most this many fresh problems")
    parser.add_argument("--draw", type=int, default=3200, help="problems drawn from the test stream")
    parser.add_argument("--with-test", action="store_true", help="score the test split too")
    parser.add_argument("--records", help="write each adapter's completions and rewards here, as JSONL")
    parser.add_argument("adapters", nargs="+", metavar="NAME=DIR", help="adapters to score")
    args = parser.parse_args(argv)
    if any("=" not in a for a in args.adapters):
        parser.error("adapters are given as NAME=DIR")
    return args


def fresh_problems(task: Any, cfg: Any, size: int, draw: int) -> list[Any]:
    """Problems of the config's task that none of its splits (built by `task`) holds."""
    taken = {problem_key(e) for split in SPLITS for e in task.checked_split(split)}
    wide = dataclasses.replace(cfg.task, test_size=draw, validation_size=0, train_size=0, sft_size=0)
    return [e for e in get_task(wide).checked_split("test") if problem_key(e) not in taken][:size]


def stratum(example: Any) -> str:
    """The kind of problem: arithmetic's operation, the IFEval-like task's number of instructions."""
    if "kind" in example.meta:
        return str(example.meta["kind"])
    ids = getattr(example.answer, "instruction_ids", None)
    if ids is None:
        return "all"
    return f"{len(ids)} instruction{'s' if len(ids) != 1 else ''}"


def mix(examples: list[Any]) -> dict[str, int]:
    return dict(sorted(Counter(stratum(e) for e in examples).items()))


def compare_on(cfg: Any, task: Any, examples: list[Any], adapters: list[tuple[str, str]], start: str,
               test_mix: dict[str, int], loaded: Any, records_prefix: str | None) -> dict[str, Any]:
    """Each adapter against `start` on `examples`: overall, per stratum, at the test split's mix
    (None where `examples` lack one of the test split's strata)."""
    strata = [stratum(e) for e in examples]

    def correct_of(name: str, path: str) -> np.ndarray:
        result = score_adapter(cfg, task, examples, path, loaded=loaded)
        if records_prefix is not None:
            atomic_write_jsonl(f"{records_prefix}_{name}.jsonl", result.records)
        return np.asarray(result.correct)

    first = correct_of("start", start)
    out: dict[str, Any] = {"examples": len(examples), "mix": mix(examples),
                           "start_accuracy": float(first.mean())}
    for name, path in adapters:
        correct = correct_of(name, path)
        paired = compare_paired(first, correct, seed=0)
        per_stratum = {}
        for label in sorted(set(strata)):
            rows = [i for i, s in enumerate(strata) if s == label]
            part = compare_paired(first[rows], correct[rows], seed=0)
            per_stratum[label] = {"start": part.mean_a, "delta": part.delta, "delta_ci95": list(part.ci95)}
        try:
            at_mix, interval = stratified_delta(correct - first, strata, test_mix, seed=0)
            at_mix_ci: list[float] | None = list(interval)
        except EssaError:  # a test stratum without fresh problems: no reweighted delta
            at_mix, at_mix_ci = None, None
        out[name] = {"accuracy": float(correct.mean()), **paired_fields(paired), "strata": per_stratum,
                     "delta_at_test_mix": at_mix, "delta_at_test_mix_ci95": at_mix_ci}
        at_mix_text = "n/a (a stratum is missing)" if at_mix is None else f"{at_mix:+.3f} {at_mix_ci}"
        log(f"{name}: {paired.delta:+.3f} {paired.ci95}; at the test mix {at_mix_text}")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, [])
    task = get_task(cfg.task)
    examples = fresh_problems(task, cfg, args.size, args.draw)
    test = task.checked_split("test")
    log(f"{len(examples)} fresh problems, mix {mix(examples)}; test mix {mix(test)}")
    loaded = load_inputs(cfg, None, 1.0, kind=evaluation_kind(cfg)).weights()
    adapters = [tuple(a.split("=", 1)) for a in args.adapters]
    if args.records:
        ensure_writable_dir(args.records)
    prefix = (lambda part: f"{args.records}/{part}") if args.records else (lambda part: None)
    out = compare_on(cfg, task, examples, adapters, args.start, mix(test), loaded, prefix("fresh"))
    if args.with_test:
        out["test"] = compare_on(cfg, task, test, adapters, args.start, mix(test), loaded, prefix("test"))
    return out


if __name__ == "__main__":
    sys.exit(json_main(run, _parse(sys.argv[1:])))
