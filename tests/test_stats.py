"""Paired statistics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from essa.errors import EssaError
from essa.stats import compare_paired, mcnemar_exact_p, paired_bootstrap_ci, stratified_delta


@pytest.mark.parametrize("gained, lost, p", [
    (0, 0, 1.0),
    (1, 0, 1.0),          # 2 * 1/2
    (5, 0, 0.0625),       # 2 * 1/32
    (0, 5, 0.0625),
    (8, 2, 0.109375),     # 2 * (1 + 10 + 45) / 1024
    (14, 3, 0.0127258),   # 2 * (1 + 17 + 136 + 680) / 131072
    (10, 10, 1.0),
])
def test_mcnemar_exact_matches_hand_computed(gained, lost, p):
    assert mcnemar_exact_p(gained, lost) == pytest.approx(p, abs=1e-6)


@pytest.mark.parametrize("gained, lost", [(700, 600), (600, 700), (2500, 2400), (0, 3000), (5000, 5000)])
def test_mcnemar_exact_holds_at_thousands_of_discordant_pairs(gained, lost):
    from scipy.stats import binomtest
    expected = binomtest(min(gained, lost), gained + lost, 0.5).pvalue
    assert mcnemar_exact_p(gained, lost) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_bootstrap_interval_of_a_known_difference():
    # 100 problems: 20 gained, 5 lost. Delta 0.15; its standard error is
    # sqrt((p+ + p- - delta^2) / n) = sqrt((0.25 - 0.0225) / 100) = 0.0477, so the 95% interval is
    # about 0.15 +- 1.96 * 0.0477 = [0.056, 0.243].
    diffs = np.array([1.0] * 20 + [-1.0] * 5 + [0.0] * 75)
    low, high = paired_bootstrap_ci(diffs, resamples=20000, seed=1)
    assert low == pytest.approx(0.056, abs=0.012) and high == pytest.approx(0.243, abs=0.012)


def test_bootstrap_of_graded_scores_uses_resampling():
    rng = np.random.default_rng(0)
    diffs = rng.normal(0.1, 0.2, 400)
    low, high = paired_bootstrap_ci(diffs, resamples=4000, seed=0)
    se = diffs.std() / np.sqrt(len(diffs))
    assert low == pytest.approx(diffs.mean() - 1.96 * se, abs=0.004)
    assert high == pytest.approx(diffs.mean() + 1.96 * se, abs=0.004)


def test_compare_paired_counts_and_verdict():
    a = np.array([1, 1, 0, 0, 1, 0, 1, 0] * 10, dtype=float)
    b = np.array([1, 1, 1, 1, 1, 0, 0, 0] * 10, dtype=float)
    result = compare_paired(a, b, seed=0)
    assert (result.n, result.gained, result.lost) == (80, 20, 10)
    assert result.delta == pytest.approx(0.125)
    assert result.mcnemar_p == pytest.approx(mcnemar_exact_p(20, 10))
    assert result.ci95[0] < result.delta < result.ci95[1]
    # 20 gained, 10 lost of 80: the interval [-0.013, +0.263] still holds zero.
    assert result.describe().endswith("no difference beyond noise")
    tripled = compare_paired(np.tile(a, 3), np.tile(b, 3), seed=0)  # 60 / 30 of 240: a gain
    assert tripled.ci95[0] > 0 and tripled.describe().endswith(": a gain")
    assert compare_paired(np.tile(b, 3), np.tile(a, 3), seed=0).describe().endswith(": a loss")
    identical = compare_paired(a, a)
    assert identical.ci95 == (0.0, 0.0) and identical.mcnemar_p == 1.0
    assert "no difference beyond noise" in identical.describe()
    assert compare_paired([0.5, 0.2], [0.7, 0.1]).mcnemar_p is None  # graded scores: no McNemar


def test_stratified_delta_reweights_strata_to_another_mix():
    # Stratum "one": 20 of 100 gained (mean 0.2, standard error sqrt(0.2 * 0.8 / 100) = 0.04);
    # stratum "two": 200 ties. Reweighted to 1:3 the delta is 0.25 * 0.2 = 0.05 and its standard
    # error 0.25 * 0.04 = 0.01, so the 95% interval is about 0.05 +- 0.0196; the examples' own
    # mix (1:2) gives 0.2 / 3.
    diffs = np.array([1.0] * 20 + [0.0] * 80 + [0.0] * 200)
    strata = ["one"] * 100 + ["two"] * 200
    delta, (low, high) = stratified_delta(diffs, strata, {"one": 1.0, "two": 3.0}, resamples=20000, seed=2)
    assert delta == pytest.approx(0.05)
    assert low == pytest.approx(0.0304, abs=0.004) and high == pytest.approx(0.0696, abs=0.004)
    assert stratified_delta(diffs, strata, {"one": 100, "two": 200})[0] == pytest.approx(0.2 / 3)
    only_ties, interval = stratified_delta(diffs, strata, {"one": 0.0, "two": 1.0})
    assert only_ties == 0.0 and interval == (0.0, 0.0)


def test_stratified_delta_refuses_a_weighted_stratum_without_examples():
    with pytest.raises(EssaError, match=r"no examples in weighted strata \['three'\]"):
        stratified_delta(np.zeros(2), ["one", "two"], {"one": 1.0, "three": 1.0})
    with pytest.raises(EssaError, match="one stratum per"):
        stratified_delta(np.zeros(2), ["one"], {"one": 1.0})


def test_unpaired_input_is_refused():
    with pytest.raises(EssaError, match="same examples"):
        compare_paired([1, 0, 1], [1, 0])
    with pytest.raises(EssaError, match="no examples"):
        compare_paired([], [])


def test_paired_ratio_pools_numerators_over_denominators():
    from essa.stats import compare_paired_ratio

    # Two prompts: 3 instructions (A follows 1, B follows 3) and 1 instruction (A 1, B 0).
    result = compare_paired_ratio([1, 1], [3, 0], [3, 1], resamples=2000)
    assert result.mean_a == pytest.approx(2 / 4) and result.mean_b == pytest.approx(3 / 4)
    assert result.delta == pytest.approx(0.25) and (result.gained, result.lost) == (1, 0 + 1)
    assert result.mcnemar_p is None
    # Resampling two prompts: both picks of prompt 1 -> +2/3, both of prompt 2 -> -1, one of each -> +1/4.
    assert -1.0 - 1e-9 <= result.ci95[0] and result.ci95[1] <= 2 / 3 + 1e-9
    same = compare_paired_ratio([1, 2, 0], [1, 2, 0], [2, 2, 1])
    assert same.delta == 0 and same.ci95 == (0.0, 0.0)
    with pytest.raises(EssaError):
        compare_paired_ratio([1], [1, 2], [1, 1])
