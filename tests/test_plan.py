"""The Appendix-B cost model: formulas, the inequality, parsing, and the files `essa plan` writes."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest

from essa import plan
from essa.cli import parse_args
from essa.errors import EssaError
from essa.plan import PlanInputs

# Small numbers whose results are easy to compute by hand.
SMALL = PlanInputs(
    model_params=1000, bytes_per_param=2, bandwidth=100, gen_throughput=50, fb_throughput=25,
    popsize=5, essa_batch=2, grad_batch=4, tokens=10, pair_bytes=8, essa_generations=3, grad_steps=7,
)


def plan_main(argv, calibrate_fn=None):
    """`essa plan ARGV` as the CLI parses it, with an optional calibration in place of a measurement."""
    return plan.run_plan(parse_args(["plan", *argv]), calibrate_fn=calibrate_fn)


def test_formulas_match_hand_computed_values():
    # G=4: grad all-reduce 2*2000*3/(4*100) = 30 s; ESSA all-gather of 5*8 = 40 B: 40*3/400 = 0.3 s.
    assert plan.grad_comm_time(SMALL, 4) == pytest.approx(30.0)
    assert plan.essa_comm_time(SMALL, 4) == pytest.approx(0.3)
    # ESSA compute 5*2*10 tokens / (4*50 tok/s) = 0.5 s.
    essa = plan.essa_generation_time(SMALL, 4)
    assert essa["compute"] == pytest.approx(0.5) and essa["total"] == pytest.approx(0.8)
    # Grad: 40 tokens; rollout 40/200 = 0.2 s, forward-backward 40/100 = 0.4 s, + 30 s comm.
    grad = plan.grad_step_time(SMALL, 4)
    assert grad["rollout"] == pytest.approx(0.2)
    assert grad["forward_backward"] == pytest.approx(0.4)
    assert grad["total"] == pytest.approx(30.6)
    row = plan.plan_row(SMALL, 4)
    assert row["essa_time_to_target_s"] == pytest.approx(3 * 0.8)
    assert row["grad_time_to_target_s"] == pytest.approx(7 * 30.6)
    assert row["essa_speedup"] == pytest.approx(7 * 30.6 / (3 * 0.8))
    assert row["step_over_generation"] == pytest.approx(30.6 / 0.8)


def test_inequality_hand_computed_sides():
    # eta_gen = 10/(4*50) = 0.05 s, eta_fb = 10/25 = 0.4 s, M = 2*2000 - 40 = 3960 B.
    # rhs = 4*(0.4/(4*0.05) + 1) + 3*3960/(100*4*0.05) = 12 + 594 = 606; lhs = 5*2 = 10.
    lhs, rhs = plan.inequality_sides(SMALL, 4)
    assert lhs == 10 and rhs == pytest.approx(606.0)
    assert plan.essa_generation_faster(SMALL, 4)


def test_no_communication_on_one_gpu():
    assert plan.grad_comm_time(SMALL, 1) == 0 and plan.essa_comm_time(SMALL, 1) == 0
    # G=1: ESSA 10*10/50 = 2 s; grad 40/50 + 40/25 = 2.4 s.
    assert plan.essa_generation_time(SMALL, 1)["total"] == pytest.approx(2.0)
    assert plan.grad_step_time(SMALL, 1)["total"] == pytest.approx(2.4)


def test_inequality_agrees_with_direct_time_comparison_over_a_grid():
    verdicts = []
    grid = itertools.product(
        [1e6, 1e9, 32e9], [1e9, 50e9], [200.0, 2000.0], [500.0, 5000.0], [4, 96], [1, 100], [8, 512],
        [16, 1024], [1, 2, 3, 8, 128],
    )
    for params, bw, gen, fb, pop, b_essa, b_grad, tokens, gpus in grid:
        p = replace(SMALL, model_params=params, bandwidth=bw, gen_throughput=gen, fb_throughput=fb,
                    popsize=pop, essa_batch=b_essa, grad_batch=b_grad, tokens=tokens)
        t_essa = plan.essa_generation_time(p, gpus)["total"]
        t_grad = plan.grad_step_time(p, gpus)["total"]
        if math.isclose(t_essa, t_grad, rel_tol=1e-9):
            continue  # a tie can round either way
        faster = plan.essa_generation_faster(p, gpus)
        assert faster == (t_essa < t_grad), (p, gpus, t_essa, t_grad)
        verdicts.append(faster)
    assert any(verdicts) and not all(verdicts)  # the grid exercises both outcomes


def test_essa_communication_is_independent_of_model_size():
    for gpus in (2, 16, 128):
        small, big = replace(SMALL, model_params=1e6), replace(SMALL, model_params=72e9)
        assert plan.essa_comm_time(small, gpus) == plan.essa_comm_time(big, gpus) > 0
        ratio = plan.grad_comm_time(big, gpus) / plan.grad_comm_time(small, gpus)
        assert ratio == pytest.approx(72e9 / 1e6)
    # It does scale with the population: one pair per candidate.
    doubled = replace(SMALL, popsize=10)
    assert plan.essa_comm_time(doubled, 8) == pytest.approx(2 * plan.essa_comm_time(SMALL, 8))


def test_32b_essa_speedup_grows_with_gpus():
    rows = plan.plan_rows(PlanInputs(model_params=32e9), list(plan.DEFAULT_GPUS))
    speedups = [r["essa_speedup"] for r in rows]
    ratios = [r["step_over_generation"] for r in rows]
    assert all(b > a for a, b in zip(speedups, speedups[1:])), speedups
    assert all(b > a for a, b in zip(ratios, ratios[1:])), ratios
    assert speedups[-1] > speedups[0] * 1.2


def test_more_bandwidth_shrinks_the_gradient_comm_only():
    slow, fast = replace(SMALL, bandwidth=10.0), replace(SMALL, bandwidth=1000.0)
    assert plan.grad_comm_time(slow, 8) == pytest.approx(100 * plan.grad_comm_time(fast, 8))
    assert plan.essa_generation_time(slow, 8)["compute"] == plan.essa_generation_time(fast, 8)["compute"]
    assert plan.essa_comm_time(slow, 8) == pytest.approx(100 * plan.essa_comm_time(fast, 8))


@pytest.mark.parametrize(
    "text, value",
    [("32B", 32e9), ("32e9", 32e9), ("135M", 135e6), ("1.5k", 1500.0), ("7 b", 7e9), ("2T", 2e12),
     ("100", 100.0)],
)
def test_parse_count(text, value):
    assert plan.parse_count(text) == pytest.approx(value)


@pytest.mark.parametrize(
    "text, value",
    [("50GB/s", 50e9), ("400Gb/s", 50e9), ("400Gbps", 50e9), ("25GiB/s", 25 * 2**30), ("50e9", 50e9),
     ("100 GB/s", 100e9), ("800 Mbit/s", 100e6)],
)
def test_parse_bandwidth(text, value):
    assert plan.parse_bandwidth(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["32Q", "", "abc", "-5", "0", "1e999", "nan"])
def test_bad_counts_raise(text):
    with pytest.raises(EssaError):
        plan.parse_count(text)


@pytest.mark.parametrize("text", ["fast", "50G", "50 GB/h", "0GB/s", "-1GB/s"])
def test_bad_bandwidth_raises(text):
    with pytest.raises(EssaError):
        plan.parse_bandwidth(text)


def test_parse_gpus():
    assert plan.parse_gpus("8, 1,2,2") == [1, 2, 8]
    for bad in ("-2", "0", "1,x", "", "1.5"):
        with pytest.raises(EssaError):
            plan.parse_gpus(bad)


@pytest.mark.parametrize(
    "argv",
    [["--gpus", "-2"], ["--gpus=1,-4"], ["--model-params", "32Q"], ["--bandwidth", "fast"],
     ["--popsize", "0"], ["--tokens", "1.5"], ["--gen-throughput", "-3"], ["--no-such-flag"]],
)
def test_bad_cli_input_raises_essa_error(argv, tmp_path):
    with pytest.raises(EssaError):
        plan_main(argv + ["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_inputs_reject_non_positive_values():
    with pytest.raises(EssaError):
        PlanInputs(bandwidth=0)
    with pytest.raises(EssaError):
        plan.plan_rows(SMALL, [0])


def test_calibrate_requires_a_function():
    with pytest.raises(EssaError, match="calibrate"):
        plan_main(["--calibrate"])


def test_calibrate_replaces_default_throughputs(tmp_path):
    argv = ["--calibrate", "--gpus", "2", "--out", str(tmp_path)]
    assert plan_main(argv, calibrate_fn=lambda: (123.0, 456.0)) == 0
    inputs = json.loads((tmp_path / "plan.json").read_text())["inputs"]
    assert inputs["gen_throughput"] == 123.0 and inputs["fb_throughput"] == 456.0
    # An explicit flag still wins over the measurement.
    argv = ["--calibrate", "--fb-throughput", "99", "--out", str(tmp_path)]
    plan_main(argv, calibrate_fn=lambda: (1.0, 2.0))
    inputs = json.loads((tmp_path / "plan.json").read_text())["inputs"]
    assert inputs["gen_throughput"] == 1.0 and inputs["fb_throughput"] == 99.0


@pytest.mark.parametrize("measured", [(0.0, 10.0), (10.0,), None, (10.0, float("nan"))])
def test_calibration_returning_garbage_raises(measured):
    with pytest.raises(EssaError):
        plan_main(["--calibrate"], calibrate_fn=lambda: measured)


def test_main_prints_table_and_assumptions(capsys):
    assert plan_main(["--model-params", "32B", "--gpus", "1,16,128"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("G "))
    for column in ("ESSA/gen", "grad/step", "ESSA comm", "grad comm", "gen<step?", "speedup"):
        assert column in header
    table_rows = [line.split()[0] for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert table_rows == ["1", "16", "128"]
    assert "Assumptions:" in out and "ring all-reduce" in out and "perfect compute scaling" in out


def test_outputs_written_atomically(tmp_path, monkeypatch):
    written = []
    for name in ("atomic_write_json", "atomic_write_bytes"):
        real = getattr(plan, name)
        def recording(path, data, _real=real):
            written.append(path.name)
            _real(path, data)

        monkeypatch.setattr(plan, name, recording)
    out = tmp_path / "nested" / "plan"
    assert plan_main(["--gpus", "1,2,4,8", "--model-params", "7e9", "--out", str(out)]) == 0
    assert sorted(written) == ["plan.json", "plan.png"]
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "plan.png"]  # no temp files left
    assert (out / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "plan.json").read_text())
    assert data["inputs"]["model_params"] == 7e9
    assert [r["gpus"] for r in data["rows"]] == [1, 2, 4, 8]
    p = PlanInputs(**data["inputs"])
    assert data["rows"][2]["grad_step_s"] == pytest.approx(plan.grad_step_time(p, 4)["total"])
    assert any("ring all-reduce" in a for a in data["assumptions"])


def test_calibration_measures_positive_throughputs(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_tiny_model_dir

    from essa.calibrate import measure_throughputs
    from essa.config import ModelConfig

    gen, fb = measure_throughputs(ModelConfig(name=str(make_tiny_model_dir(tmp_path / "m"))), batch=2, new_tokens=4)
    assert gen > 0 and fb > 0
