"""The toy digits experiment: the singular-value space is exact, and the paper's direction holds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from essa.errors import EssaError  # noqa: E402
from essa.toy import SingularSpace, ToyConfig, format_table, run_toy  # noqa: E402

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_digits.py"


def _space(seed: int = 0) -> SingularSpace:
    rng = np.random.default_rng(seed)
    return SingularSpace.from_factors(rng.normal(size=(3, 8)), rng.normal(size=(10, 3)))


def test_space_rebuilds_the_lora_product_at_its_singular_values() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 8)), rng.normal(size=(10, 3))
    space = SingularSpace.from_factors(a, b)
    x = rng.normal(size=(5, 8))
    rebuilt = space.delta_logits(x @ space.v_a, space.s0)
    np.testing.assert_allclose(rebuilt, x @ (b @ a).T, atol=1e-10)


def test_population_batch_matches_one_candidate_at_a_time() -> None:
    space = _space()
    rng = np.random.default_rng(2)
    z = rng.normal(size=(7, 3))
    cands = space.s0 + rng.normal(size=(4, 6))
    batched = space.delta_logits(z, cands)
    for p in range(4):
        np.testing.assert_allclose(batched[p], space.delta_logits(z, cands[p]), atol=1e-12)


def test_singular_value_gradient_matches_finite_differences() -> None:
    space = _space()
    rng = np.random.default_rng(3)
    z, base, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 10)), rng.integers(0, 10, size=6)
    s = space.s0 + 0.1
    _, grad = space.grad(z, base, y, s)
    eps = 1e-6
    numeric = [
        (space.grad(z, base, y, s + eps * e)[0] - space.grad(z, base, y, s - eps * e)[0])
        / (2 * eps)
        for e in np.eye(6)
    ]
    np.testing.assert_allclose(grad, numeric, atol=1e-7)


@pytest.mark.parametrize(
    "bad",
    [{"rank": 0}, {"rank": 11}, {"es_fitness": "reward"}, {"seeds": ()}, {"test_fraction": 1.0}],
)
def test_bad_config_is_a_clear_error(bad: dict) -> None:
    with pytest.raises(EssaError, match="toy config"):
        run_toy(ToyConfig(**bad))


def test_too_many_sft_samples_is_a_clear_error() -> None:
    with pytest.raises(EssaError, match="SFT samples"):
        run_toy(ToyConfig(n_sft_samples=100_000, seeds=(0,), steps=1))


@pytest.fixture(scope="module")
def reduced():
    # Checked over 30 disjoint 4-seed sets (seeds 0-59 and 100-159): ES/SFT led SGD/SFT on
    # digits 6-9 by 3.9..12.5 points, the two differed on 0-9 by -0.5..3.7, ES/SFT gained
    # 9.4..35.8 over its start, and ES/SFT led ES/random by 54..80 points.
    return run_toy(ToyConfig(seeds=(0, 1, 2, 3), steps=200, eval_every=50))


def test_es_from_sft_vectors_keeps_up_with_sgd(reduced) -> None:
    es, sgd = reduced.row("ES", "SFT"), reduced.row("SGD", "SFT")
    assert es.new_final >= es.new_before + 0.05  # ES really optimizes, not just sits at the start
    assert sgd.new_final > sgd.new_before
    assert es.new_final >= sgd.new_final - 0.03
    assert abs(es.all_final - sgd.all_final) <= 0.06


def test_es_from_random_vectors_lags_far_behind(reduced) -> None:
    es_sft, es_random = reduced.row("ES", "SFT"), reduced.row("ES", "random")
    assert es_sft.new_final - es_random.new_final >= 0.3


def test_table_and_curves_cover_every_cell(reduced) -> None:
    table = format_table(reduced)
    for method in ("ES", "SGD"):
        for vectors in ("SFT", "random"):
            assert f"| {method} | {vectors} |" in table
            curve = reduced.curves[f"{method}/{vectors}"]
            assert curve.steps == [0, 50, 100, 150, 200]
            assert len(curve.new_acc) == len(curve.all_acc) == 5
    summary = reduced.summary()
    assert summary["es_sft"] == pytest.approx(reduced.row("ES", "SFT").new_final, abs=1e-4)
    json.dumps(summary)


def test_benchmark_prints_table_then_one_json_line(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("toy_digits", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plot = tmp_path / "curves.png"
    assert module.main(["--seeds", "1", "--steps", "4", "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "| method | singular vectors |" in "\n".join(lines)
    record = json.loads(lines[-1])
    assert {"es_sft", "sgd_sft", "es_random", "sgd_random", "wall_clock_s"} <= record.keys()
    assert plot.read_bytes().startswith(b"\x89PNG")
