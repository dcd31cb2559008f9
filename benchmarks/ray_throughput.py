"""Generation throughput of the Ray population backend with 1 vs 2 workers (1 torch thread each).

Both pools evaluate the same ESSA generations (paper protocol: workers regenerate the candidates
and return only fitness) on the bundled model with a random rank-8 adapter, greedy, fp32, on the
arithmetic task. Both pools stay alive side by side and generations are interleaved
(1 worker, 2 workers, 1 worker, ...) after one untimed warm-up generation each; medians are
reported because the machine is shared and noisy. Tokens are the workers' counts of completion
tokens (decoded text re-tokenized). The two pools must return identical fitness (greedy), which
the benchmark checks. The last stdout line is one JSON object; progress goes to stderr.

    python benchmarks/ray_throughput.py [--candidates 16] [--prompts 4] [--max-new-tokens 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import build_random_adapter, json_main, log, require_positive
from essa.backends.ray_backend import RayPopulationEvaluator
from essa.config import BackendConfig, Config, DecodingConfig, ModelConfig, SearchConfig, TaskConfig
from essa.models import load_model
from essa.optim import make_optimizer


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="timed generations per pool, interleaved")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--sigma0", type=float, default=0.05)
    p.add_argument("--model", default=ModelConfig().name)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    require_positive(p, args, ("candidates", "prompts", "max_new_tokens", "repeats", "rank"))
    if args.candidates < 2:
        p.error("--candidates must be >= 2")
    return args


def build_adapter(model_name: str, path: Path, rank: int, seed: int) -> Path:
    """A random LoRA adapter (alpha = 2 * rank, B entries of std 0.03) for a freshly loaded model."""
    model, _ = load_model(ModelConfig(name=model_name))
    return build_random_adapter(model, path, rank, lora_alpha=2.0 * rank, b_std=0.03, seed=seed)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    load0 = os.getloadavg()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0,
                              batch_size=args.candidates * args.prompts)
    search = SearchConfig(optimizer="sep-cma", popsize=args.candidates, sigma0=args.sigma0, seed=args.seed)
    task = TaskConfig(name="arithmetic", train_size=max(args.prompts, 8))
    prompt_indices = list(range(args.prompts))
    # Three logical CPUs: both pools (1 + 2 workers) stay alive; only one pool runs at a time.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    pools: dict[int, RayPopulationEvaluator] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="essa-ray-bench-") as tmp:
            adapter = build_adapter(args.model, Path(tmp) / "adapter", args.rank, args.seed)
            startup = {}
            for n in (1, 2):
                t0 = time.perf_counter()
                cfg = Config(model=ModelConfig(name=args.model), task=task, decoding=decoding, essa=search,
                             backend=BackendConfig(kind="ray", workers=n, threads_per_worker=1))
                pools[n] = RayPopulationEvaluator(cfg, adapter, 1.0, log=log)
                startup[n] = round(time.perf_counter() - t0, 1)
        optimizers = {n: make_optimizer(search, pools[n].dim) for n in pools}
        rates: dict[int, list[float]] = {1: [], 2: []}
        seconds: dict[int, list[float]] = {1: [], 2: []}
        fitness: dict[int, list[np.ndarray]] = {1: [], 2: []}
        for gen in range(args.repeats + 1):
            for n, pool in pools.items():
                t0 = time.perf_counter()
                population, fit = pool.run_indices(gen, optimizers[n], prompt_indices, seed=gen)
                dt = time.perf_counter() - t0
                optimizers[n].tell(population, fit)
                fitness[n].append(fit)
                if gen == 0:
                    log(f"warm-up {n} worker(s): {dt:.1f} s")
                    continue
                seconds[n].append(round(dt, 2))
                rates[n].append(pool.tokens_last_generation / dt)
                log(f"generation {gen}, {n} worker(s): {pool.tokens_last_generation} tokens in {dt:.1f} s = "
                     f"{rates[n][-1]:.1f} tok/s, {pool.bytes_sent_last_generation} bytes")
        one, two = (statistics.median(rates[n]) for n in (1, 2))
        return {
            "tokens_per_s_1_worker": round(one, 2),
            "tokens_per_s_2_workers": round(two, 2),
            "speedup_2_vs_1": round(two / one, 3),
            "speedup_per_repeat": [round(b / a, 3) for a, b in zip(rates[1], rates[2])],
            "seconds_per_generation": {f"{n}_worker": seconds[n] for n in (1, 2)},
            "tokens_per_generation": pools[2].tokens_last_generation,
            "bytes_per_generation": {f"{n}_worker": pools[n].bytes_sent_last_generation for n in (1, 2)},
            "same_fitness_1_vs_2_workers": all(np.array_equal(a, b) for a, b in zip(fitness[1], fitness[2])),
            "fitness_mean_last": round(float(fitness[2][-1].mean()), 4),
            "startup_s": {f"{n}_worker": startup[n] for n in (1, 2)},
            "load_average_start": [round(x, 2) for x in load0],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "settings": {
                "model": args.model, "dtype": "float32", "decoding": "greedy", "candidates": args.candidates,
                "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                "rank": args.rank, "search_dim": pools[1].dim, "threads_per_worker": 1, "task": "arithmetic",
                "ray": ray.__version__, "torch": torch.__version__,
            },
        }
    finally:
        for pool in pools.values():
            pool.close()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    return json_main(run, _parse(argv))


if __name__ == "__main__":
    sys.exit(main())
