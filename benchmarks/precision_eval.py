"""Held-out accuracy and speed of the base model's precisions on the demo task.

Evaluates one SFT adapter (e.g. the demo's: `essa sft --config src/essa/configs/demo.yaml
output_dir=runs/demo-sft`) on the demo task's test split with the local runtime in each precision:
fp32, bf16, int8 (per-token int8 activations x per-channel int8 weights, `torch._int_mm`) and int4
(weight-only, groups of 32, bf16 activations). Repetitions are interleaved and the median time is
reported with its ratio to fp32 on the same run, and each precision's accuracy against fp32's on the
same problems (paired delta, bootstrap 95% CI, McNemar p). The last stdout line is one JSON object.

    python benchmarks/precision_eval.py --adapter runs/demo-sft [--repeats 2] [--threads 1]
        [--limit N] [--precisions fp32,bf16,int8,int4]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Any

import torch
from _common import json_main, log, require_positive

from essa.backends.local import LocalBackend
from essa.commands import resolve_adapter_dir
from essa.config import load_config
from essa.evaluate import evaluate_split
from essa.models import load_model
from essa.stats import compare_paired
from essa.svd_space import SvdLoraSpace
from essa.tasks import get_task

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "..", "src", "essa", "configs", "demo.yaml")
# precision -> (model dtype, model.quantize)
PRECISIONS = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"),
              "int8": ("float32", "int8"), "int4": ("bfloat16", "int4")}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", required=True, help="SFT adapter dir (or a run dir holding adapter/)")
    p.add_argument("--config", default=DEMO_CONFIG)
    p.add_argument("--precisions", default="fp32,bf16,int8,int4")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="first N test problems only")
    args = p.parse_args(argv)
    args.precisions = args.precisions.split(",")
    unknown = [x for x in args.precisions if x not in PRECISIONS]
    if unknown:
        p.error(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    require_positive(p, args, ("repeats", "threads"))
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, [f"model.threads={args.threads}"])
    task = get_task(cfg.task)
    examples = task.checked_split("test")[:args.limit]
    adapter = resolve_adapter_dir(args.adapter)
    models = {dtype: load_model(dataclasses.replace(cfg.model, dtype=dtype))
              for dtype in sorted({PRECISIONS[p][0] for p in args.precisions})}
    space = SvdLoraSpace.from_adapter(adapter, 1.0, model=next(iter(models.values()))[0])
    seconds: dict[str, list[float]] = {name: [] for name in args.precisions}
    correct: dict[str, Any] = {}  # per precision, 1.0 where the test problem was answered correctly
    for rep in range(args.repeats):
        for name in args.precisions:
            dtype, quantize = PRECISIONS[name]
            model, tokenizer = models[dtype]
            # Built per run (not timed): backends wrap the model's layers, and close() unwraps them.
            backend = LocalBackend(model, tokenizer, space, cfg.decoding, quantize=quantize)
            try:
                t = time.perf_counter()
                result = evaluate_split(backend, tokenizer, task, examples)
                seconds[name].append(time.perf_counter() - t)
            finally:
                backend.close()
            correct[name] = result.correct
            log(f"repeat {rep + 1}/{args.repeats} {name}: accuracy {correct[name].mean():.4f} in "
                f"{seconds[name][-1]:.1f} s")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    base = median.get("fp32")
    return {
        "accuracy": {k: round(float(v.mean()), 4) for k, v in correct.items()},
        "seconds": {k: [round(s, 1) for s in v] for k, v in seconds.items()},
        "speedup_vs_fp32": {k: round(base / v, 3) for k, v in median.items()} if base else None,
        # Each precision against fp32 on the same problems: delta, paired bootstrap 95% CI, McNemar p.
        "vs_fp32": {k: compare_paired(correct["fp32"], v).to_dict() for k, v in correct.items() if k != "fp32"}
        if "fp32" in correct else None,
        "settings": {"config": os.path.relpath(args.config), "adapter": str(adapter), "examples": len(examples),
                     "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__},
    }


def main(argv: list[str] | None = None) -> int:
    return json_main(run, _parse(argv))


if __name__ == "__main__":
    sys.exit(main())
