"""Paired statistics for two models scored on the same examples.

Two accuracies measured on the same held-out problems are compared problem by problem: the
delta, a paired bootstrap 95% confidence interval for it, and McNemar's exact test on the
problems where exactly one of the two is right. A gain whose interval includes zero is no gain.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from essa.errors import EssaError

BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class PairedComparison:
    n: int  # examples scored by both
    mean_a: float
    mean_b: float
    delta: float  # mean_b - mean_a
    ci95: tuple[float, float]  # paired bootstrap, percentile interval of the delta
    gained: int  # examples where b scores higher than a
    lost: int  # examples where a scores higher than b
    mcnemar_p: float | None  # exact two-sided McNemar p-value (0/1 scores only)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci95"] = list(self.ci95)
        return out

    def describe(self, name_a: str = "A", name_b: str = "B") -> str:
        p = "" if self.mcnemar_p is None else f", McNemar p = {self.mcnemar_p:.3g}"
        verdict = ("a gain" if self.ci95[0] > 0 else "a loss" if self.ci95[1] < 0
                   else "no difference beyond noise")
        return (f"{name_a} {self.mean_a:.3f} -> {name_b} {self.mean_b:.3f} ({self.delta:+.3f}, paired 95% CI "
                f"[{self.ci95[0]:+.3f}, {self.ci95[1]:+.3f}]; {self.gained} gained, {self.lost} lost{p}): {verdict}")


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: a binomial(gained + lost, 1/2) test on the discordant pairs."""
    if gained < 0 or lost < 0:
        raise EssaError("discordant counts must be >= 0")
    n = gained + lost
    if n == 0:
        return 1.0
    k = min(gained, lost)
    # Exact in integers, divided once: 2.0**n overflows a float from n = 1024 on.
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_bootstrap_ci(diffs: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of per-example differences, resampling examples."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.ndim != 1 or len(diffs) == 0:
        raise EssaError("a paired bootstrap needs a non-empty 1-D array of per-example differences")
    means = _bootstrap_means(diffs, resamples, np.random.default_rng(seed))
    return _percentile_interval(means, level)


def stratified_delta(diffs: np.ndarray, strata: list[str], weights: dict[str, float],
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                     level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """The mean difference reweighted to another mix of strata, with its bootstrap interval.

    Post-stratification: each stratum's mean difference weighted by `weights` (normalised), so
    problems drawn in another mix (e.g. fresh problems against a test split) estimate the delta
    the test split's mix would show. The interval resamples examples within each stratum.
    """
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.ndim != 1 or len(diffs) != len(strata):
        raise EssaError("stratified_delta needs one stratum per per-example difference")
    total = sum(weights.values())
    present = set(strata)
    missing = sorted(s for s, w in weights.items() if w > 0 and s not in present)
    if total <= 0 or missing:
        raise EssaError(f"no examples in weighted strata {missing}" if missing else "weights must sum to > 0")
    rng = np.random.default_rng(seed)
    labels = np.asarray(strata, dtype=object)
    delta, means = 0.0, np.zeros(resamples)
    for name, weight in weights.items():
        if weight <= 0:
            continue
        part = diffs[labels == name]
        delta += weight / total * float(part.mean())
        means += weight / total * _bootstrap_means(part, resamples, rng)
    return delta, _percentile_interval(means, level)


def _bootstrap_means(diffs: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `resamples` resamples (with replacement) of `diffs`."""
    values = np.unique(diffs)
    if len(values) <= 3:
        # Few distinct differences (0/1 scores give -1, 0, 1): resampling n examples is a
        # multinomial draw of how often each value is picked, which is cheap at any n.
        counts = rng.multinomial(len(diffs), [np.mean(diffs == v) for v in values], size=resamples)
        return counts @ values / len(diffs)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks keep memory at 1000 x n
        idx = rng.integers(0, len(diffs), size=(min(1000, resamples - start), len(diffs)))
        means[start:start + len(idx)] = diffs[idx].mean(axis=1)
    return means


def _percentile_interval(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def compare_paired(scores_a: np.ndarray | list[float], scores_b: np.ndarray | list[float],
                   seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> PairedComparison:
    """B against A on the same examples, in the same order (scores: rewards or 0/1 correctness)."""
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise EssaError(f"paired scores need the same examples in the same order (got {a.shape} and {b.shape})")
    if len(a) == 0:
        raise EssaError("no examples to compare")
    diffs = b - a
    gained, lost = int((diffs > 0).sum()), int((diffs < 0).sum())
    binary = bool(np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())
    return PairedComparison(
        n=len(a), mean_a=float(a.mean()), mean_b=float(b.mean()), delta=float(diffs.mean()),
        ci95=paired_bootstrap_ci(diffs, resamples=resamples, seed=seed), gained=gained, lost=lost,
        mcnemar_p=mcnemar_exact_p(gained, lost) if binary else None,
    )


def compare_paired_ratio(num_a: np.ndarray | list[float], num_b: np.ndarray | list[float],
                         den: np.ndarray | list[float], seed: int = 0,
                         resamples: int = BOOTSTRAP_RESAMPLES) -> PairedComparison:
    """B against A on a pooled ratio, sum(num) / sum(den), over the same examples (IFEval's
    instruction-level accuracy: instructions followed over instructions, per prompt `num` / `den`).

    The interval resamples examples and recomputes both ratios, so prompts with many
    instructions weigh as they do in the metric. `gained` / `lost` count examples whose
    numerator rose / fell.
    """
    a, b, d = (np.asarray(x, dtype=np.float64) for x in (num_a, num_b, den))
    if not (a.shape == b.shape == d.shape) or a.ndim != 1 or len(a) == 0:
        raise EssaError("a paired ratio needs equal-length, non-empty numerators and denominators")
    if d.sum() <= 0:
        raise EssaError("a paired ratio needs a positive total denominator")
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks keep memory at 1000 x n
        idx = rng.integers(0, len(a), size=(min(1000, resamples - start), len(a)))
        deltas[start:start + len(idx)] = (b[idx].sum(axis=1) - a[idx].sum(axis=1)) / d[idx].sum(axis=1)
    mean_a, mean_b = float(a.sum() / d.sum()), float(b.sum() / d.sum())
    return PairedComparison(n=len(a), mean_a=mean_a, mean_b=mean_b, delta=mean_b - mean_a,
                            ci95=_percentile_interval(deltas, 0.95), gained=int((b > a).sum()),
                            lost=int((b < a).sum()), mcnemar_p=None)
