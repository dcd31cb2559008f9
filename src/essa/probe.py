"""How much signal does ES get around a start? Measured, so the search can be sized by it.

For each step size sigma, mirrored candidates z = +-sigma * eps are drawn around the start (zero
offsets) and scored on the same prompts as the start itself. Reported per sigma:
- `changed`: share of (candidate, prompt) completions that differ from the start's;
- `flipped`: share whose reward differs from the start's (what fitness can tell candidates apart by);
- `candidate_sd` against `binomial_sd`: the spread of candidate fitness, and the spread that
  resampling the prompts alone would give a candidate as good as the start;
- `split_half_rho`: the rank correlation of candidate fitness between the two halves of the
  prompts; near zero, a ranking of candidates is noise that the next prompts will not repeat.

`choose_sigma0` picks the step by one of two rules (`essa.sigma0_rule`):
- `harm` (the default): the largest probed step whose candidates do not harm the start: their
  mean reward is neither below the start's by more than HARM_Z paired standard errors over the
  prompts (one-sided 5%) nor below half of it (by more than one standard error). It needs no
  target that depends on the start: at a start that solves almost nothing no step can do harm, so
  the largest is taken (the demo's 0.8); at a start that solves ~10%, a step that throws away
  most of its right answers is refused, however few rewards that flips. The largest step is probed first, as a harmless largest step settles the choice;
  otherwise steps are probed in ascending order up to the first that harms. Where even the
  smallest harms, it is taken (docs/BENCHMARKS.md has the probe tables at three starts).
- `flips`: the smallest step whose flip rate reaches a target: small enough to stay near a good
  start, large enough that candidates differ on some prompts (with 0/1 rewards and a tiny step,
  every candidate ties with the start and selection has nothing to go on). The target, 10% of
  rewards flipped, is what the demo's runs that gained had at a start near 35%
  (docs/history/2026-12-02-es-signal-arithmetic.md); it cannot be met near a 10% start, where a
  0/1 reward flips on at most about twice the accuracy before the candidate is simply worse (the
  rule then falls back to the largest step, which did harm there). With it the probe stops at the
  first step that reaches the target, and where the start scores the same on every prompt the
  largest step is probed first: if even it flips too few rewards the choice is made
  (docs/history/2026-12-03-math-style-first-runs.md).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from essa.backends import Backend, half_means
from essa.evaluate import score
from essa.tasks import Example, Task, format_prompt

DEFAULT_SIGMAS = (0.1, 0.2, 0.4, 0.8)
TARGET_FLIPS = 0.10  # share of (candidate, prompt) rewards that differ from the start's
HARM_Z = 1.645  # one-sided 5%: how many paired standard errors below the start counts as harm
KEEP_SHARE = 0.5  # candidates that keep less than this share of the start's reward harm it too
SIGMA0_RULES = ("harm", "flips")


@dataclass(frozen=True)
class ProbeRow:
    sigma: float
    changed: float
    flipped: float
    start_fitness: float
    candidate_mean: float
    candidate_sd: float
    binomial_sd: float
    split_half_rho: float | None
    loss_vs_start: float = 0.0  # start fitness - candidates' mean fitness (paired per prompt)
    loss_se: float = 0.0  # its standard error over the prompts

    def harms(self) -> bool:
        """The candidates lose to the start beyond noise (one-sided, HARM_Z standard errors), or keep
        less than KEEP_SHARE of its reward by more than one standard error: near a 10% start, 32
        prompts cannot make even a total loss significant (0.094 -> 0.016 is 1.5 standard errors)."""
        significant = self.loss_vs_start > HARM_Z * self.loss_se if self.loss_se > 0 else self.loss_vs_start > 0
        halved = self.candidate_mean < KEEP_SHARE * self.start_fitness and self.loss_vs_start > self.loss_se
        return significant or halved

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_signal(backend: Backend, tokenizer: Any, task: Task, examples: list[Example],
                 sigmas: tuple[float, ...] = DEFAULT_SIGMAS, candidates: int = 8, seed: int = 0,
                 stop_at_flips: float | None = None, stop_at_harm: bool = False) -> list[ProbeRow]:
    """One `ProbeRow` per probed sigma (ascending), from `candidates` mirrored candidates scored on
    `examples`. With `stop_at_flips`: none after the first whose flip rate reaches it, and only the
    largest when the start scores the same on every prompt and the largest does not reach it. With
    `stop_at_harm`: only the largest when it does no harm, else none after the first that harms."""
    if candidates < 2 or candidates % 2:
        raise ValueError("the probe needs an even number of candidates (they come in mirrored pairs)")
    prompts = [format_prompt(tokenizer, task, ex) for ex in examples]
    start_text = backend.evaluate(np.zeros((1, backend.dim)), prompts, seed=seed)[0]
    start = score(task, [start_text], examples)[0]

    def probe(index: int, sigma: float) -> ProbeRow:
        # Candidates depend on (seed, step index) only, so the order steps are probed in is free.
        eps = np.random.default_rng([seed, index]).standard_normal((candidates // 2, backend.dim))
        population = sigma * np.concatenate([eps, -eps])
        texts = backend.evaluate(population, prompts, seed=seed)
        return _row(sigma, texts, score(task, texts, examples), start_text, start)

    def reached(row: ProbeRow) -> bool:
        return (stop_at_flips is not None and row.flipped >= stop_at_flips) or (stop_at_harm and row.harms())

    ordered = sorted(sigmas)
    rows: dict[int, ProbeRow] = {}
    if stop_at_harm or (stop_at_flips is not None and np.ptp(start) == 0):
        last = len(ordered) - 1
        rows[last] = probe(last, ordered[last])
        if not reached(rows[last]):  # no smaller step reaches what the largest does not
            return [rows[last]]
    for index, sigma in enumerate(ordered):
        if index not in rows:
            rows[index] = probe(index, sigma)
        if reached(rows[index]):
            break
    return [rows[i] for i in sorted(rows)]


def _row(sigma: float, texts: list[list[str]], rewards: np.ndarray, start_text: list[str],
         start: np.ndarray) -> ProbeRow:
    fitness = rewards.mean(axis=1)
    p = float(start.mean())
    losses = start - rewards.mean(axis=0)  # per prompt: the start's reward minus the candidates' mean
    return ProbeRow(
        sigma=float(sigma),
        changed=float(np.mean([[t != s for t, s in zip(row, start_text)] for row in texts])),
        flipped=float(np.mean(rewards != start[None, :])),
        start_fitness=p,
        candidate_mean=float(fitness.mean()),
        candidate_sd=float(fitness.std(ddof=1)),
        binomial_sd=float(np.sqrt(p * (1 - p) / rewards.shape[1])),
        split_half_rho=split_half_rho(rewards),
        loss_vs_start=float(losses.mean()),
        loss_se=float(losses.std(ddof=1) / np.sqrt(len(losses))) if len(losses) > 1 else 0.0,
    )


def split_half_rho(rewards: np.ndarray) -> float | None:
    """Spearman correlation of candidate fitness on the first and second half of the prompts."""
    return rank_agreement(*half_means(rewards).T)


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman correlation of two fitness vectors of the same candidates (None when fewer than
    three candidates, or when either vector ranks them all the same)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b)[0])


def choose_sigma0(rows: list[ProbeRow], target_flips: float = TARGET_FLIPS, *, rule: str) -> float:
    """Rule `harm`: the largest sigma below the first that harms the start (the smallest probed if
    it already does). Rule `flips`: the smallest sigma whose flip rate reaches `target_flips`; the
    largest probed if none does."""
    ordered = sorted(rows, key=lambda r: r.sigma)
    if rule == "harm":
        harmless = list(itertools.takewhile(lambda r: not r.harms(), ordered))
        return (harmless[-1] if harmless else ordered[0]).sigma
    for row in ordered:
        if row.flipped >= target_flips:
            return row.sigma
    return ordered[-1].sigma
