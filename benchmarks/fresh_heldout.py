"""Adapters scored against a start on more held-out problems than a config's test split.

Builds up to `--size` problems disjoint by problem key (`essa.tasks.splits.problem_key`:
arithmetic's operation and operands, the IFEval-like task's prompt) from all four splits of the
config's task: its test stream drawn on past `test_size`, every key of the config's splits
removed. Works for the tasks whose splits are generated streams (arithmetic, ifeval without
`eval_file`, math and gsm8k procedural). Each adapter is scored greedily on them and compared with
`--start` (paired delta, bootstrap 95% CI, McNemar p). One JSON line.

Where a problem space is small, the fresh problems are the generator's leftovers, not a sample
from the same distribution as the test split: easy arithmetic has about 1,100 keys per kind, so
where the splits take most of them the leftovers skew towards the keys drawn least often (for
subtraction, the larger first operands); IFEval-like prompts with one instruction are few, so the
leftovers are mostly two-instruction prompts. Compare their mix with the test split's before
pooling the two.

    python benchmarks/fresh_heldout.py --config src/essa/configs/demo.yaml \\
        --start runs/demo/sft/adapter essa=runs/demo/adapter grpo=runs/cmp/grpo/lr_0.0003/snapshots/step00005
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from _common import json_main, log

from essa.commands import evaluation_kind, load_inputs, paired_fields, score_adapter
from essa.config import load_config
from essa.stats import compare_paired
from essa.tasks import get_task
from essa.tasks.base import SPLITS
from essa.tasks.splits import problem_key


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's config")
    parser.add_argument("--start", required=True, help="the adapter the others are compared with")
    parser.add_argument("--size", type=int, default=2000, help="at most this many fresh problems")
    parser.add_argument("--draw", type=int, default=3200, help="problems drawn from the test stream")
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, [])
    task = get_task(cfg.task)
    examples = fresh_problems(task, cfg, args.size, args.draw)
    log(f"{len(examples)} fresh problems")
    loaded = load_inputs(cfg, None, 1.0, kind=evaluation_kind(cfg)).weights()
    start = score_adapter(cfg, task, examples, args.start, loaded=loaded).correct
    out: dict[str, Any] = {"examples": len(examples), "start_accuracy": sum(start) / len(examples)}
    for name, path in (a.split("=", 1) for a in args.adapters):
        correct = score_adapter(cfg, task, examples, path, loaded=loaded).correct
        paired = compare_paired(start, correct, seed=0)
        out[name] = {"accuracy": sum(correct) / len(examples), **paired_fields(paired)}
        log(f"{name}: {paired.delta:+.3f} {paired.ci95}")
    return out


if __name__ == "__main__":
    sys.exit(json_main(run, _parse(sys.argv[1:])))
