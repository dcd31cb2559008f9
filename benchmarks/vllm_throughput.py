"""Throughput of the vLLM backend against the population runtime on the same population.

Both backends generate the same (candidate, prompt) grid on the bundled model, greedy, fp32,
with the same random SVD-LoRA population: the population runtime (`LocalBackend`, one batched
`generate` per chunk of rows, per-row singular values) and vLLM (`VllmBackend`, one LoRA adapter
per candidate, one `generate` call). Tokens are counted the same way for both: the completion's
tokens plus one for EOS. Repetitions are interleaved and medians reported; engine start-up is
reported apart. The last stdout line is one JSON object; progress goes to stderr.

Needs vLLM (on CPU: the environment scripts/test-vllm.sh builds, `.venv-vllm`):

    .venv-vllm/bin/python benchmarks/vllm_throughput.py [--candidates 16] [--prompts 8]
        [--max-new-tokens 64] [--batch-size 128] [--repeats 2] [--threads 1] [--quick]
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

import torch
from _common import build_random_adapter, json_main, log, require_positive
from population_throughput import _agreement, _mean_reward, _prompts, random_population

from essa.backends.local import LocalBackend
from essa.config import DecodingConfig, ModelConfig
from essa.models import engine_model_source, load_model
from essa.svd_space import SvdLoraSpace


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128, help="rows per generate call (population runtime)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch / vLLM CPU threads")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--b-std", type=float, default=0.03)
    p.add_argument("--offset-frac", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=ModelConfig().name)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.candidates, args.prompts, args.max_new_tokens, args.repeats = 2, 2, 8, 1
    require_positive(p, args, ("candidates", "prompts", "max_new_tokens", "batch_size", "repeats", "threads"))
    return args


def _tokens(tokenizer: Any, texts: list[list[str]]) -> int:
    flat = [t for row in texts for t in row]
    return sum(len(ids) + 1 for ids in tokenizer(flat, add_special_tokens=False)["input_ids"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from essa.backends.vllm_backend import VllmBackend

    load0 = os.getloadavg()
    model, tokenizer = load_model(ModelConfig(name=args.model, dtype="float32", threads=args.threads))
    task, examples, prompts = _prompts(tokenizer, args.prompts)
    gen = DecodingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="essa-bench-") as tmp:
        adapter = build_random_adapter(model, Path(tmp) / "adapter", args.rank, 2.0 * args.rank,
                                       args.b_std, args.seed)
        space = SvdLoraSpace.from_adapter(adapter, alpha=1.0, model=model)
    population = random_population(space, args.candidates, args.offset_frac, args.seed + 1)
    local = LocalBackend(model, tokenizer, space, gen)
    t0 = time.perf_counter()
    engine = VllmBackend(engine_model_source(args.model), tokenizer, space, gen, max_loras=args.candidates,
                         threads=args.threads)
    startup_s = time.perf_counter() - t0
    log(f"vLLM engine started in {startup_s:.1f} s")
    backends = {"population": local, "vllm": engine}
    try:
        for name, backend in backends.items():  # warm-up: kernels, first LoRA loads
            backend.evaluate(population[:2], prompts[:2])
        seconds: dict[str, list[float]] = {name: [] for name in backends}
        texts: dict[str, list[list[str]]] = {}
        for rep in range(args.repeats):
            for name, backend in backends.items():
                t = time.perf_counter()
                texts[name] = backend.evaluate(population, prompts)
                seconds[name].append(time.perf_counter() - t)
                log(f"repeat {rep + 1}/{args.repeats} {name}: {seconds[name][-1]:.1f} s")
    finally:
        engine.close()
        local.close()
    tokens = {name: _tokens(tokenizer, texts[name]) for name in backends}
    tps = {name: tokens[name] / statistics.median(seconds[name]) for name in backends}
    return {
        "population_tokens_per_s": round(tps["population"], 2),
        "vllm_tokens_per_s": round(tps["vllm"], 2),
        "vllm_vs_population": round(tps["vllm"] / tps["population"], 3),
        "seconds": {k: [round(s, 2) for s in v] for k, v in seconds.items()},
        "tokens": tokens,
        "vllm_engine_startup_s": round(startup_s, 1),
        "completion_agreement": round(_agreement(texts["vllm"], texts["population"]), 3),
        "reward_mean": {k: round(_mean_reward(task, examples, v), 4) for k, v in texts.items()},
        "load_average_start": [round(x, 2) for x in load0],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {"model": args.model, "candidates": args.candidates, "prompts": args.prompts,
                     "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                     "threads": args.threads, "repeats": args.repeats, "search_dim": space.dim,
                     "torch": torch.__version__, "quick": args.quick},
    }


def main(argv: list[str] | None = None) -> int:
    return json_main(run, _parse(argv))


if __name__ == "__main__":
    sys.exit(main())
