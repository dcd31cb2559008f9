"""The sigma0 probe's full table around an SFT start, and the step each rule (`essa.sigma0_rule`)
takes from it: the measurement behind the harm rule at starts near 3%, 10% and 35%.

    python benchmarks/probe_starts.py --config configs/math.yaml --adapter runs/math-sft/adapter \
        --seeds 0 1 2

For each seed, the probe prompts are drawn as `essa train` draws them (the trainer's stream for
that seed, min(prompts_per_generation, 32) training prompts) and every step of the ladder is
probed (no early stop), so both rules' choices and the losses against the start can be read off
one table. One JSON line on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from _common import json_main, log

from essa.backends import build_backend, load_inputs
from essa.config import load_config
from essa.probe import DEFAULT_SIGMAS, SIGMA0_RULES, TARGET_FLIPS, choose_sigma0, probe_signal
from essa.tasks import get_task
from essa.trainer import PROBE_PROMPTS


def run(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, [f"adapter={args.adapter}", *args.overrides])
    task = get_task(cfg.task)
    train = task.checked_split("train")
    inputs = load_inputs(cfg, cfg.adapter, cfg.essa.alpha)
    backend = build_backend(cfg, inputs)
    results = []
    try:
        for seed in args.seeds:
            t0 = time.perf_counter()
            rng = np.random.default_rng([seed, 2**32 - 1])  # the trainer's probe stream (EssaTrainer._initial_sigma)
            size = min(cfg.essa.prompts_per_generation, PROBE_PROMPTS, len(train))
            picked = rng.choice(len(train), size=size, replace=False)
            rows = probe_signal(backend, inputs.tokenizer, task, [train[i] for i in picked],
                                sigmas=tuple(args.sigmas), seed=seed)
            choices = {rule: choose_sigma0(rows, TARGET_FLIPS, rule=rule) for rule in SIGMA0_RULES}
            log(f"seed {seed}: start {rows[0].start_fitness:.3f}, choices {choices}, "
                f"{time.perf_counter() - t0:.0f} s")
            for r in rows:
                log(f"  sigma {r.sigma}: flipped {r.flipped:.3f}, candidates {r.candidate_mean:.3f}, "
                    f"loss {r.loss_vs_start:+.3f} +- {r.loss_se:.3f}{' HARMS' if r.harms() else ''}")
            results.append({"seed": seed, "choices": choices, "rows": [r.to_dict() for r in rows],
                            "seconds": round(time.perf_counter() - t0, 1)})
    finally:
        backend.close()
    return {"config": args.config, "adapter": args.adapter, "overrides": args.overrides, "probes": results}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--adapter", required=True, help="the SFT start (a PEFT adapter dir)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS))
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args()
    if any(s <= 0 for s in args.sigmas):
        p.error("--sigmas must be > 0")
    return json_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
