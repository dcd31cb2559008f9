"""The MATH task: LaTeX answer equivalence (math-verify), procedural and file splits, targets."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import pytest
import sympy
from math_verify import parse
from sympy.parsing.sympy_parser import (
    implicit_multiplication_application,
    parse_expr,
    standard_transformations,
)

from essa.config import TaskConfig
from essa.errors import EssaError
from essa.tasks import SPLITS, Example, RewardStats, safe_reward
from essa.tasks.math_task import (
    MathTask,
    answers_equivalent,
    latex_fraction,
    latex_radical,
    make_math_problem,
    math_reward,
    simplest_radical,
    too_costly,
)
from task_helpers import assert_disjoint, assert_held_out_by_problem, write_jsonl

SMALL = {"sft_size": 40, "train_size": 30, "validation_size": 10, "test_size": 12}


def value_of(latex: str) -> sympy.Expr:
    """The sympy value of a LaTeX answer, read independently of the task's reward."""
    parsed = parse(f"${latex}$")
    assert parsed, latex
    return sympy.nsimplify(parsed[0])


# ---- answer equivalence -----------------------------------------------------------------------

@pytest.mark.parametrize("predicted, gold", [
    ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("0.5", "\\frac{1}{2}"),
    ("1/2", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("\\frac{2}{4}", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("2\\sqrt2", "2\\sqrt{2}"),
    ("-0.75", "-\\frac{3}{4}"),
    ("\\frac{-3}{4}", "-\\frac{3}{4}"),
    ("x = 2", "2"),
    ("1,000", "1000"),
    ("1 + x^2", "x^2 + 1"),
    ("(1, 2)", "(1,2)"),
    ("\\text{Monday}", "\\text{Monday}"),
])
def test_equivalent_forms_match(predicted, gold):
    assert answers_equivalent(predicted, gold)


@pytest.mark.parametrize("predicted, gold", [
    ("\\frac{1}{3}", "\\frac{1}{2}"),
    ("0.51", "\\frac{1}{2}"),
    ("2\\sqrt{3}", "2\\sqrt{2}"),
    ("\\sqrt{2}", "2\\sqrt{2}"),
    ("3.01", "3"),
    ("-\\frac{3}{4}", "\\frac{3}{4}"),
    ("", "\\frac{1}{2}"),
    ("\\frac{1}{2", "\\frac{1}{2}"),
    ("}}}", "5"),
])
def test_different_answers_do_not_match(predicted, gold):
    assert not answers_equivalent(predicted, gold)


@pytest.mark.parametrize("completion, gold, reward", [
    ("so $x = \\frac{1}{2}$ and the answer is \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),  # wrong
    ("\\boxed{\\frac{1}{3}} no, \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # last box wins
    ("\\boxed{\\frac{1}{2}} no, \\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{\\frac{1}{2}} and then \\boxed{}", "\\frac{1}{2}", 1.0),  # empty box skipped
    ("The answer is 0.5", "\\frac{1}{2}", 1.0),  # no box: documented fallback
    ("after all that we get 7", "7", 1.0),  # no box: the last number
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0.0),  # unterminated box: the fallback reads "2"
    ("\\boxed{\\frac{1}{2}", "2", 1.0),
    ("\\boxed{}", "\\frac{1}{2}", 0.0),
    ("", "\\frac{1}{2}", 0.0),
    ("I cannot solve this.", "\\frac{1}{2}", 0.0),
    ("\\boxed{nan}", "\\frac{1}{2}", 0.0),
    ("\\boxed{\\infty}", "5", 0.0),
    ("}}{{\\boxed\\boxed{{", "5", 0.0),
    ("\\boxed{\\frac{1}{0}}", "5", 0.0),
    ("\\boxed{5}", float("nan"), 0.0),  # a non-text gold never matches
    (None, "5", 0.0),
    (5, "5", 0.0),
])
def test_math_reward(completion, gold, reward):
    assert math_reward(completion, gold) == reward


@pytest.mark.parametrize("answer, costly", [
    ("9^{9^{9^{9}}}", True), ("9^9^9", True), ("2^{(3^4)}", True), ("10^{100000}", True),
    ("(10^{10})!", True), ("12345!", True), ("1" * 400, True),
    ("x^2 + y^2", False), ("2^{10}", False), ("5!", False), ("\\frac{3}{4}", False),
    ("e^{i\\pi}", False),
])
def test_too_costly(answer, costly):
    assert too_costly(answer) == costly


def reward_in_child_worker_thread(completion: str, gold: str, timeout: float = 120.0) -> float:
    """math_reward(completion, gold) in a worker thread of a fresh process, killed if it hangs.

    A separate process, because a runaway big-integer power holds the GIL and would stall this one.
    """
    code = ("import sys, threading\n"
            "from essa.tasks.math_task import math_reward\n"
            "out = []\n"
            "score = lambda: out.append(math_reward(sys.argv[1], sys.argv[2]))\n"
            "t = threading.Thread(target=score)\n"
            "t.start(); t.join(); print(out[0])\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, completion, gold], capture_output=True,
                              text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail("math_reward did not return from a worker thread")
    return float(done.stdout.strip())


def test_reward_from_worker_threads():
    cases = [("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
             ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
             ("\\boxed{0.75}", "\\frac{3}{5}", 0.0), ("\\boxed{(2, 1)}", "(2,1)", 1.0)]
    assert threading.current_thread() is threading.main_thread()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: math_reward(c[0], c[1]), cases))
    assert results == [c[2] for c in cases]
    # A power tower would run for ever without math-verify's (main-thread only) timeout.
    assert reward_in_child_worker_thread("\\boxed{9^{9^{9^{9}}}}", "5") == 0.0
    assert reward_in_child_worker_thread("\\boxed{\\sqrt{8}}", "2\\sqrt{2}") == 1.0


def test_reward_never_raises():
    task = MathTask(TaskConfig(name="math", **SMALL))
    stats = RewardStats()
    example = Example(prompt="p", answer="\\frac{1}{2}")
    for junk in ("\\boxed{" * 300, "\\boxed{" + "(" * 200 + "}", "\\boxed{\\frac{\\frac{}{}}{}}",
                 "\\boxed{\\sqrt{-}}", "\\boxed{\\begin{pmatrix}}", "\x00", "$$$$"):
        assert safe_reward(task, junk, example, stats) == 0.0
    assert stats.failures == 0


# ---- LaTeX helpers (hand-checked) -------------------------------------------------------------

@pytest.mark.parametrize("value, text", [
    (Fraction(3, 4), "\\frac{3}{4}"), (Fraction(-1, 2), "-\\frac{1}{2}"), (Fraction(6, 3), "2"),
    (Fraction(-5, 1), "-5"), (Fraction(10, 4), "\\frac{5}{2}"),
])
def test_latex_fraction(value, text):
    assert latex_fraction(value) == text


@pytest.mark.parametrize("n, pair, text", [
    (72, (6, 2), "6\\sqrt{2}"), (650, (5, 26), "5\\sqrt{26}"), (5, (1, 5), "\\sqrt{5}"),
    (49, (7, 1), "7"), (1, (1, 1), "1"), (180, (6, 5), "6\\sqrt{5}"),
])
def test_radicals(n, pair, text):
    assert simplest_radical(n) == pair
    assert latex_radical(n) == text


# ---- procedural problems ----------------------------------------------------------------------

_IMPLICIT = standard_transformations + (implicit_multiplication_application,)
_INT = r"(-?\d+)"
_FRAC = r"\\frac\{(\d+)\}\{(\d+)\}"
_POINTS = rf"\$\({_INT}, {_INT}\)\$ and \$\({_INT}, {_INT}\)\$"


def expected_value(example: Example) -> sympy.Expr:
    """The answer recomputed from the prompt text alone."""
    kind, prompt = example.meta["kind"], example.prompt
    if kind == "fraction_sum":
        a, b, op, c, d = re.search(rf"{_FRAC} ([+-]) {_FRAC}", prompt).groups()
        sign = 1 if op == "+" else -1
        return sympy.Rational(int(a), int(b)) + sign * sympy.Rational(int(c), int(d))
    if kind == "fraction_product":
        a, b, op, c, d = re.search(rf"{_FRAC} \\(cdot|div) {_FRAC}", prompt).groups()
        left, right = sympy.Rational(int(a), int(b)), sympy.Rational(int(c), int(d))
        return left * right if op == "cdot" else left / right
    if kind == "radical":
        return sympy.sqrt(int(re.search(r"\\sqrt\{(\d+)\}", prompt).group(1)))
    if kind == "linear":
        a, sign, b, c = re.search(rf"\$(-?\d+)x ([+-]) (\d+) = {_INT}\$", prompt).groups()
        x = sympy.Symbol("x")
        b_value = int(b) if sign == "+" else -int(b)
        return sympy.solve(int(a) * x + b_value - int(c), x)[0]
    if kind in ("distance", "slope"):
        x1, y1, x2, y2 = map(int, re.search(_POINTS, prompt).groups())
        if kind == "slope":
            return sympy.Rational(y2 - y1, x2 - x1)
        return sympy.sqrt((x2 - x1) ** 2 + (y2 - y1) ** 2)
    if kind == "roots":
        poly = re.search(r"\$(.*) = 0\$", prompt).group(1).replace("^", "**")
        roots = sympy.roots(parse_expr(poly, transformations=_IMPLICIT), multiple=True)
        return sum(roots) if "sum" in prompt else sympy.Mul(*roots)
    if kind == "decimal":
        return sympy.Rational(re.search(r"\$([\d.]+)\$", prompt).group(1))
    if kind == "powers":
        a, m, op, b, n = re.search(r"\$(\d+)\^(\d+) ([+-]) (\d+)\^(\d+)\$", prompt).groups()
        return int(a) ** int(m) + (1 if op == "+" else -1) * int(b) ** int(n)
    raise AssertionError(kind)


def test_procedural_answers_are_correct_and_targets_score_one():
    rng = random.Random(7)
    kinds = set()
    for _ in range(180):
        example = make_math_problem(rng)
        kinds.add(example.meta["kind"])
        assert sympy.simplify(value_of(example.answer) - expected_value(example)) == 0, example
        assert example.target.endswith(f"The answer is \\boxed{{{example.answer}}}.")
        assert math_reward(example.target, example.answer) == 1.0, example
        wrong = example.target.replace(f"\\boxed{{{example.answer}}}",
                                       f"\\boxed{{{example.answer} + 1}}")
        assert math_reward(wrong, example.answer) == 0.0, wrong
    assert kinds == {"fraction_sum", "fraction_product", "radical", "linear", "distance", "slope",
                     "roots", "decimal", "powers"}


def test_procedural_answers_are_in_simplest_form():
    rng = random.Random(3)
    for _ in range(200):
        answer = make_math_problem(rng).answer
        for num, den in re.findall(r"\\frac\{(\d+)\}\{(\d+)\}", answer):
            assert Fraction(int(num), int(den)).denominator == int(den) != 1, answer
        for radicand in re.findall(r"\\sqrt\{(\d+)\}", answer):
            assert simplest_radical(int(radicand)) == (1, int(radicand)), answer


def test_procedural_splits_sizes_disjoint_deterministic():
    task = MathTask(TaskConfig(name="math", seed=0, **SMALL))
    assert task.source == "procedural"
    for split in SPLITS:
        assert len(task.split(split)) == SMALL[f"{split}_size"]
    assert_disjoint(task)
    assert_held_out_by_problem(task)  # by expression, operands of + and * unordered
    again = MathTask(TaskConfig(name="math", seed=0, **SMALL))
    assert task.split("sft") == again.split("sft")
    smaller = MathTask(TaskConfig(name="math", seed=0, **{**SMALL, "sft_size": 3}))
    assert smaller.split("test") == task.split("test")
    messages = task.messages(task.split("test")[0])
    assert "\\boxed{}" in messages[0]["content"] and "step by step" in messages[0]["content"]


# ---- file source ------------------------------------------------------------------------------

def math_row(i: int, with_answer: bool) -> dict:
    """Problem i: solve i x = 1, answer \\frac{1}{i} (or i for i = 1)."""
    gold = latex_fraction(Fraction(1, i))
    row = {"problem": f"Solve for $x$: ${i}x = 1$.",
           "solution": f"Divide by {i}: $x = \\boxed{{{gold}}}$.", "level": "Level 1"}
    if with_answer:
        row["answer"] = gold
    return row


@pytest.fixture
def math_files(tmp_path: Path) -> tuple[Path, Path]:
    train = [math_row(i, with_answer=False) for i in range(1, 101)] + [math_row(500, False)]
    test = [math_row(i, with_answer=True) for i in range(500, 520)]
    return (write_jsonl(tmp_path / "train.jsonl", train),
            write_jsonl(tmp_path / "math500.jsonl", test))


def file_task(files, seed: int = 0, **sizes) -> MathTask:
    train, test = files
    return MathTask(TaskConfig(name="math", seed=seed, options={
        "train_file": str(train), "test_file": str(test)}, **{**SMALL, **sizes}))


def test_file_splits_disjoint_gold_and_targets(math_files):
    task = file_task(math_files)
    assert task.source == "data"
    for split in SPLITS:
        assert len(task.split(split)) == SMALL[f"{split}_size"]
    assert_disjoint(task)
    test_prompts = {math_row(i, True)["problem"] for i in range(500, 520)}
    assert {e.prompt for e in task.split("test")} <= test_prompts
    for split in ("sft", "train", "validation"):
        assert not {e.prompt for e in task.split(split)} & test_prompts
    for example in (e for s in SPLITS for e in task.split(s)):
        i = int(re.search(r"\$(\d+)x", example.prompt).group(1))
        assert value_of(example.answer) == sympy.Rational(1, i)
        assert task.reward(task.sft_target(example), example) == 1.0
        assert task.reward("\\boxed{2}", example) == 0.0


def test_answer_field_wins_and_target_ends_boxed(tmp_path):
    rows = [{"problem": "What is half of one?", "solution": "It is \\boxed{0.5}.",
             "answer": "\\frac{1}{2}"},
            {"problem": "What is $2+2$?", "answer": "4"}]
    test = write_jsonl(tmp_path / "t.jsonl", rows)
    task = MathTask(TaskConfig(name="math", options={"test_file": str(test)}, sft_size=0,
                               train_size=0, validation_size=0, test_size=2))
    by_prompt = {e.prompt: e for e in task.split("test")}
    half = by_prompt["What is half of one?"]
    assert half.answer == "\\frac{1}{2}"
    assert half.target == "It is \\boxed{0.5}.\nThe answer is \\boxed{\\frac{1}{2}}."
    assert by_prompt["What is $2+2$?"].target == "The answer is \\boxed{4}."
    for example in task.split("test"):
        assert task.reward(example.target, example) == 1.0


def test_parquet_source(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [math_row(i, with_answer=True) for i in range(2, 12)]
    path = tmp_path / "test.parquet"
    pq.write_table(pyarrow.Table.from_pylist(rows), path)
    task = MathTask(TaskConfig(name="math", options={"test_file": str(path)}, sft_size=0,
                               train_size=0, validation_size=0, test_size=10))
    assert sorted(e.answer for e in task.split("test")) == sorted(r["answer"] for r in rows)


def test_missing_problem_names_file_and_line(tmp_path, math_files):
    _, test = math_files
    bad = write_jsonl(tmp_path / "broken.jsonl", [math_row(1, True), {"solution": "\\boxed{1}"}])
    with pytest.raises(EssaError, match=r"broken\.jsonl.*line 2.*'problem'"):
        file_task((bad, test))


def test_row_without_gold_names_file_and_record(tmp_path, math_files):
    _, test = math_files
    bad = write_jsonl(tmp_path / "nogold.jsonl",
                      [math_row(1, True), math_row(2, True), {"problem": "Hm?", "solution": "42"}])
    with pytest.raises(EssaError, match=r"nogold\.jsonl.*record 3.*answer"):
        file_task((bad, test), sft_size=1, train_size=1, validation_size=1)


def test_too_many_asked_is_a_clear_error(math_files):
    with pytest.raises(EssaError, match="lower the split sizes"):
        file_task(math_files, test_size=21)


def test_unknown_option():
    with pytest.raises(EssaError, match="unknown option"):
        MathTask(TaskConfig(name="math", options={"levels": [1]}, **SMALL))


def test_default_data_sources_are_math_train_and_math500(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split=None):
        calls.append((name, split))
        first = 500 if "500" in name else 1
        return [math_row(i, with_answer="500" in name) for i in range(first, first + 80)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = MathTask(TaskConfig(name="math", options={"source": "data"}, **SMALL))
    assert sorted(calls) == [("DigitalLearningGmbH/MATH-lighteval", "train"),
                             ("HuggingFaceH4/MATH-500", "test")]
    assert all(int(re.search(r"\$(\d+)x", e.prompt).group(1)) >= 500 for e in task.split("test"))
    assert_disjoint(task)
