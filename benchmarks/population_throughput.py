"""Throughput of the population-batched SVD-LoRA runtime against the plain model and per-candidate merging.

Three modes generate the same (candidate, prompt) grid on the bundled model, greedy, fp32:

- population: `LocalBackend` with an SVD-LoRA space; batches mix rows of different candidates.
- plain: the same model without any adapter, every prompt repeated once per candidate.
- naive: per candidate, merge W += scale * B'A' into the weights, generate its prompts in one
  batch, restore the original weights (merge and restore are timed).

Tokens are counted per row up to and including EOS (HF pads rows that finished early).
Repetitions are interleaved (plain, population, naive, plain, ...) and medians reported, since
the machine is shared and noisy. The last stdout line is one JSON object; progress goes to stderr.
On a CPU shared with other busy processes, pass `--threads 1`: with more threads than free cores,
OpenMP barriers stall and small batches (the naive mode) slow down several-fold.

    python benchmarks/population_throughput.py [--candidates 32] [--prompts 8] [--max-new-tokens 64]
        [--batch-size 64] [--repeats 2] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import build_random_adapter, json_main, log, require_positive

from essa.backends.local import LocalBackend
from essa.config import DecodingConfig, ModelConfig, TaskConfig
from essa.errors import EssaError
from essa.models import eos_token_ids, load_model
from essa.population import PopulationModel
from essa.svd_space import SvdLoraSpace
from essa.tasks import format_prompt, get_task

MODES = ("plain", "population", "naive")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128, help="rows per generate call (plain, population)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of the three modes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--b-std", type=float, default=0.03, help="std of the random LoRA B entries")
    p.add_argument("--offset-frac", type=float, default=0.2,
                   help="offsets ~ N(0, (frac * singular value)^2) per trainable singular value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=ModelConfig().name)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.candidates, args.prompts, args.max_new_tokens = 3, 2, 8
        args.batch_size, args.repeats = 4, 1
    require_positive(p, args, ("candidates", "prompts", "max_new_tokens", "batch_size", "repeats", "rank"))
    return args


# --- setup ------------------------------------------------------------------------------------


def random_population(space: SvdLoraSpace, n: int, frac: float, seed: int) -> np.ndarray:
    """(n, dim) offsets, each a random fraction of the singular value it moves."""
    scales = np.concatenate([np.concatenate([p.s_a[:p.trainable].numpy(), p.s_b[:p.trainable].numpy()])
                             for p in space.pairs])
    return np.random.default_rng(seed).normal(0.0, 1.0, size=(n, space.dim)) * frac * scales


class GenerateRecorder:
    """Shadows `model.generate` on the instance to count real generated tokens of every call."""

    def __init__(self, model: torch.nn.Module, eos_ids: tuple[int, ...]):
        self.model = model
        self.eos_ids = eos_ids
        self.inner = model.generate
        self.tokens = 0  # per row: up to and including the first EOS
        self.steps = 0  # rows x generated length (padding included)
        model.generate = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        ids = self.inner(*args, **kwargs)
        new = ids[:, kwargs["input_ids"].shape[1]:]
        self.tokens += real_token_count(new, self.eos_ids)
        self.steps += new.numel()
        return ids

    def reset(self) -> None:
        self.tokens = self.steps = 0


def real_token_count(new: torch.Tensor, eos_ids: tuple[int, ...]) -> int:
    """Generated tokens per row up to and including the first EOS (any of the model's), summed over rows."""
    is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, new.shape[1])
    return int(first.sum())


@contextmanager
def plain_layers(backend: LocalBackend) -> Iterator[None]:
    """Temporarily unwrap the population layers, so the model runs exactly as loaded."""
    pm = backend.population_model
    model = pm.remove()
    try:
        yield
    finally:
        backend.population_model = PopulationModel(model, pm.space)


# --- the three modes --------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    tokens: int
    steps: int
    texts: list[list[str]] = field(repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _timed(recorder: GenerateRecorder, fn: Any) -> Run:
    recorder.reset()
    t0 = time.perf_counter()
    texts = fn()
    return Run(time.perf_counter() - t0, recorder.tokens, recorder.steps, texts)


def run_population(backend: LocalBackend, population: np.ndarray, prompts: list[str]) -> list[list[str]]:
    return backend.evaluate(population, prompts)


def run_plain(plain: LocalBackend, n_cand: int, prompts: list[str]) -> list[list[str]]:
    flat = plain.evaluate(None, prompts * n_cand)[0]
    return [flat[c * len(prompts):(c + 1) * len(prompts)] for c in range(n_cand)]


def run_naive(plain: LocalBackend, space: SvdLoraSpace, population: np.ndarray,
              prompts: list[str]) -> list[list[str]]:
    """Per candidate: merge its delta into the weights, generate, restore the saved weights."""
    modules = dict(plain.model.named_modules())
    weights = {p.name: modules[p.name].weight for p in space.pairs}
    originals = {name: w.detach().clone() for name, w in weights.items()}
    out = []
    with torch.no_grad():
        for z in population:
            factors = space.factors(z)
            for p in space.pairs:
                a, b = factors[p.name]
                weights[p.name].addmm_(b, a, alpha=p.scale)
            try:
                out.append(plain.evaluate(None, prompts)[0])
            finally:
                for name, w in weights.items():
                    w.copy_(originals[name])
    return out


# --- reporting --------------------------------------------------------------------------------


def _agreement(a: list[list[str]], b: list[list[str]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def _mean_reward(task: Any, examples: list[Any], texts: list[list[str]]) -> float:
    scores = [task.reward(t, ex) for row in texts for t, ex in zip(row, examples)]
    return float(np.mean(scores))


def _summary(runs: dict[str, list[Run]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, rs in runs.items():
        out[f"{mode}_tokens_per_s"] = round(statistics.median(r.tokens_per_s for r in rs), 2)
        out[f"{mode}_step_tokens_per_s"] = round(statistics.median(r.steps / r.seconds for r in rs), 2)
        out[f"{mode}_tokens"] = rs[-1].tokens
        out[f"{mode}_step_tokens"] = rs[-1].steps
        out[f"{mode}_seconds"] = [round(r.seconds, 2) for r in rs]
    pop, plain, naive = (out[f"{m}_tokens_per_s"] for m in ("population", "plain", "naive"))
    out["ratio_vs_plain"] = round(pop / plain, 3)
    out["speedup_vs_naive"] = round(pop / naive, 3)
    # Per-step cost, independent of where EOS falls in each mode's completions.
    out["step_ratio_vs_plain"] = round(out["population_step_tokens_per_s"] / out["plain_step_tokens_per_s"], 3)
    out["ratio_vs_plain_per_repeat"] = [round(p.tokens_per_s / q.tokens_per_s, 3)
                                        for p, q in zip(runs["population"], runs["plain"])]
    return out


# --- main -------------------------------------------------------------------------------------


def _prompts(tokenizer: Any, n: int) -> tuple[Any, list[Any], list[str]]:
    task = get_task(TaskConfig())
    examples = task.checked_split("validation")[:n]
    if len(examples) < n:
        raise EssaError(f"the arithmetic validation split has only {len(examples)} prompts (asked for {n})")
    return task, examples, [format_prompt(tokenizer, task, ex) for ex in examples]


def run(args: argparse.Namespace) -> dict[str, Any]:
    load0 = os.getloadavg()
    log(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    t_start = time.perf_counter()
    model, tokenizer = load_model(ModelConfig(name=args.model, dtype="float32", threads=args.threads))
    task, examples, prompts = _prompts(tokenizer, args.prompts)
    gen = DecodingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="essa-bench-") as tmp:
        adapter = build_random_adapter(model, Path(tmp) / "adapter", args.rank, args.lora_alpha,
                                       args.b_std, args.seed)
        space = SvdLoraSpace.from_adapter(adapter, alpha=1.0, model=model)
    log(space.describe())
    population = random_population(space, args.candidates, args.offset_frac, args.seed + 1)
    recorder = GenerateRecorder(model, eos_token_ids(tokenizer, model.generation_config))
    backend = LocalBackend(model, tokenizer, space, gen)
    plain = LocalBackend(model, tokenizer, None, gen)

    log("warm-up")
    backend.evaluate(population[:2], prompts[:2])
    with plain_layers(backend):
        plain.evaluate(None, prompts[:2])

    modes = {
        "plain": lambda: run_plain(plain, args.candidates, prompts),
        "population": lambda: run_population(backend, population, prompts),
        "naive": lambda: run_naive(plain, space, population, prompts),
    }
    runs: dict[str, list[Run]] = {m: [] for m in MODES}
    for rep in range(args.repeats):
        for mode in MODES:
            if mode == "population":
                r = _timed(recorder, modes[mode])
            else:
                with plain_layers(backend):
                    r = _timed(recorder, modes[mode])
            runs[mode].append(r)
            log(f"repeat {rep + 1}/{args.repeats} {mode}: {r.tokens} tokens ({r.steps} steps) in "
                 f"{r.seconds:.1f} s = {r.tokens_per_s:.1f} tok/s")
    last = {m: runs[m][-1].texts for m in MODES}
    log(f"sample (candidate 0, prompt 0): {last['population'][0][0]!r}")

    result = _summary(runs)
    result.update(
        naive_population_agreement=round(_agreement(last["naive"], last["population"]), 3),
        reward_mean={m: round(_mean_reward(task, examples, last[m]), 4) for m in MODES},
        wall_seconds=round(time.perf_counter() - t_start, 1),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        threads=torch.get_num_threads(),
        load_average_start=[round(x, 2) for x in load0],
        load_average_end=[round(x, 2) for x in os.getloadavg()],
        settings={
            "model": args.model, "dtype": "float32", "decoding": "greedy",
            "candidates": args.candidates, "prompts": args.prompts, "rows": args.candidates * args.prompts,
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "naive_batch_size": args.prompts,
            "repeats": args.repeats, "rank": args.rank, "lora_alpha": args.lora_alpha, "b_std": args.b_std,
            "offset_frac": args.offset_frac, "search_dim": space.dim, "seed": args.seed, "quick": args.quick,
            "torch": torch.__version__,
        },
    )
    return result


def main(argv: list[str] | None = None) -> int:
    return json_main(run, _parse(argv))


if __name__ == "__main__":
    sys.exit(main())
