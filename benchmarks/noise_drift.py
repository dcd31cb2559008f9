"""Does the search stay put when its fitness is noise? essa.mean_step full vs signal.

The library's optimizer and `optim.mean_rate`, driven by simulated fitness instead of a model:
each candidate's reward on each of B prompts is a coin with success probability
sigmoid(logit(p0) + w . z) (z: the candidate's offsets; w = 0: pure noise, the start's accuracy p0
whatever the candidate), scored on two halves of the prompts as the trainer scores them. The
search runs with the library's default settings (4 dimensions: one scale per module type) for a
number of generations on many seeds; printed per case: the final mean's norm (median / 90th
percentile; on noise, how far it drifted from the start), sigma (median), and the true accuracy
gain of the final mean (mean / 10th percentile). One JSON line of the results at the end.

    python benchmarks/noise_drift.py [--seeds 60] [--generations 40] [--prompts 32]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from essa.config import SearchConfig
from essa.optim import make_optimizer, mean_rate

STARTS = (0.03, 0.10, 0.35)
SLOPES = (0.0, 0.05, 0.15)  # w's largest weight: 0 is pure noise
DIM = 4


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def run_case(start: float, slope: float, mean_step: str, seeds: int, generations: int,
             prompts: int) -> dict[str, float]:
    """One (start accuracy, signal slope, mean_step) cell over `seeds` searches."""
    weights = np.array([slope, slope / 2, 0.0, 0.0])
    norms, sigmas, gains = [], [], []
    for seed in range(seeds):
        search = SearchConfig(seed=seed, mean_step=mean_step)
        optimizer = make_optimizer(search, DIM)
        rng = np.random.default_rng([seed, 1])
        base = np.log(start / (1 - start))
        for _ in range(generations):
            population = optimizer.ask()
            p = _sigmoid(base + population @ weights)
            halves = np.stack([rng.binomial(prompts // 2, p), rng.binomial(prompts - prompts // 2, p)], axis=1)
            halves = halves / np.array([prompts // 2, prompts - prompts // 2])
            optimizer.tell(population, halves.mean(axis=1), mean_rate=mean_rate(search, halves))
        norms.append(np.linalg.norm(optimizer.mean))
        sigmas.append(optimizer.sigma)
        gains.append(float(_sigmoid(base + optimizer.mean @ weights)) - start)
    return {"norm_median": float(np.median(norms)), "norm_p90": float(np.percentile(norms, 90)),
            "sigma_median": float(np.median(sigmas)), "gain_mean": float(np.mean(gains)),
            "gain_p10": float(np.percentile(gains, 10))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=60)
    p.add_argument("--generations", type=int, default=40)
    p.add_argument("--prompts", type=int, default=32, help="prompts per generation (B)")
    args = p.parse_args(argv)
    if min(args.seeds, args.generations) < 1 or args.prompts < 2:
        p.error("--seeds and --generations must be >= 1, --prompts >= 2")
    print("| start | slope w | mean_step | mean norm (median / p90) | sigma (median) | true gain (mean / p10) |")
    print("| --: | --: | --- | --- | --: | --- |")
    results = {}
    for start in STARTS:
        for slope in SLOPES:
            for mean_step in ("full", "signal"):
                r = run_case(start, slope, mean_step, args.seeds, args.generations, args.prompts)
                results[f"{start}_{slope}_{mean_step}"] = r
                print(f"| {start:.2f} | {slope:.2f} | {mean_step} | {r['norm_median']:.2f} / {r['norm_p90']:.2f} | "
                      f"{r['sigma_median']:.2f} | {r['gain_mean']:+.3f} / {r['gain_p10']:+.3f} |", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
