"""Arithmetic word problems, generated offline from templates, with an exact-answer reward.

Small numbers and one or two operations keep problems learnable by a short LoRA SFT of a
~100M-parameter model, and keep completions short: the SFT target is one line such as
"17 + 25 = 42. The answer is \\boxed{42}.".

Options (`task.options`): `difficulty` = "easy" (default: one operation, operands below 50)
or "medium" (two operations).

Each split draws from its own seeded stream, filled in the order test, validation, train, sft;
a prompt already taken by an earlier split is skipped. So the splits never share a prompt text,
and the held-out sets do not move when the SFT or train sizes change.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable

from essa.errors import EssaError
from essa.tasks.answers import numeric_reward
from essa.tasks.base import Example, Task
from essa.tasks.data import reject_unknown_options
from essa.tasks.splits import build_splits, pick_split, split_sizes

if TYPE_CHECKING:
    from essa.config import TaskConfig

SYSTEM_PROMPT = "Solve the problem. Reason briefly, then give the final answer in \\boxed{}."
DIFFICULTIES = ("easy", "medium")
_KNOWN_OPTIONS = {"difficulty"}

_NAMES = (
    ("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Lily", "she"), ("Sam", "he"),
    ("Mia", "she"), ("Jack", "he"), ("Emma", "she"), ("Leo", "he"), ("Zoe", "she"),
    ("Omar", "he"), ("Sara", "she"), ("Max", "he"), ("Nina", "she"), ("Raj", "he"),
    ("Lucy", "she"), ("Paul", "he"), ("Kate", "she"), ("Ivan", "he"), ("Rosa", "she"),
    ("Noah", "he"), ("Ella", "she"), ("Kofi", "he"), ("Yuki", "she"),
)
_OBJECTS = (
    "apples", "oranges", "pencils", "marbles", "stickers", "cookies", "books", "stamps",
    "cards", "shells", "coins", "balloons", "cupcakes", "crayons", "beads", "flowers",
    "eggs", "candies", "buttons", "toy cars", "plums", "muffins", "ribbons", "erasers",
)
_CONTAINERS = (
    ("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"),
    ("pack", "packs"), ("crate", "crates"), ("tray", "trays"),
)

_ADD = (
    "{name} has {a} {obj}. {He} buys {b} more. How many {obj} does {he} have now?",
    "There are {a} {obj} in a {box}. {name} puts in {b} more. How many {obj} are in the {box} now?",
    "{name} collected {a} {obj} on Monday and {b} {obj} on Tuesday. "
    "How many {obj} did {he} collect in total?",
    "{name} has {a} {obj} and {name2} has {b} {obj}. How many {obj} do they have together?",
)
_SUB = (
    "{name} has {a} {obj}. {He} gives {b} to {name2}. How many {obj} does {name} have left?",
    "A {box} holds {a} {obj}. {name} takes out {b}. How many {obj} are left in the {box}?",
    "{name} had {a} {obj} and sold {b} of them. How many {obj} does {he} have left?",
    "{name} has {a} {obj}. {name2} has {b} fewer {obj} than {name}. "
    "How many {obj} does {name2} have?",
)
_MUL = (
    "{name} buys {a} {boxes} with {b} {obj} in each {box}. How many {obj} does {he} buy?",
    "Each {box} holds {b} {obj}. How many {obj} are in {a} {boxes}?",
    "{name} makes {a} rows of {obj} with {b} {obj} in each row. How many {obj} are there?",
)
_DIV = (
    "{name} shares {t} {obj} equally among {b} friends. How many {obj} does each friend get?",
    "{name} packs {t} {obj} into {boxes} of {b}. How many {boxes} does {he} fill?",
    "{t} {obj} are split equally into {b} {boxes}. How many {obj} are in each {box}?",
)
_ADD_SUB = (
    "{name} has {a} {obj}. {He} buys {b} more and then gives {c} to {name2}. "
    "How many {obj} does {he} have now?",
    "A {box} holds {a} {obj}. {name} adds {b} more and later takes out {c}. "
    "How many {obj} are in the {box} now?",
)
_SUB_ADD = (
    "{name} had {a} {obj}. {He} sold {b} of them and then bought {c} more. "
    "How many {obj} does {he} have now?",
    "{name} has {a} {obj}. {He} gives {b} to {name2}, then finds {c} more. "
    "How many {obj} does {he} have now?",
)
_ADD_ADD = (
    "{name} has {a} {obj}, {name2} has {b} and {name3} has {c}. "
    "How many {obj} do they have altogether?",
    "{name} collected {a} {obj} on Monday, {b} on Tuesday and {c} on Wednesday. "
    "How many {obj} did {he} collect in total?",
)
_MUL_ADD = (
    "{name} buys {a} {boxes} with {b} {obj} in each {box}. {He} already had {c} {obj}. "
    "How many {obj} does {he} have now?",
)
_MUL_SUB = (
    "{name} has {a} {boxes} with {b} {obj} in each {box}. {He} gives away {c} {obj}. "
    "How many {obj} does {he} have left?",
)
_ADD_DIV = (
    "{name} has {a} {obj} and {name2} has {b}. They put them together and share them "
    "equally among {k} friends. How many {obj} does each friend get?",
)


def _context(rng: random.Random) -> dict[str, str]:
    """Names, pronoun, object and container that fill a template."""
    (name, he), (name2, _), (name3, _) = rng.sample(_NAMES, 3)
    box, boxes = rng.choice(_CONTAINERS)
    return {"name": name, "name2": name2, "name3": name3, "he": he, "He": he.capitalize(),
            "obj": rng.choice(_OBJECTS), "box": box, "boxes": boxes}


def _example(rng: random.Random, templates: tuple[str, ...], kind: str, steps: list[str],
             answer: int, numbers: dict[str, int]) -> Example:
    prompt = rng.choice(templates).format(**_context(rng), **numbers)
    target = " ".join(f"{s}." for s in steps) + f" The answer is \\boxed{{{answer}}}."
    return Example(prompt=prompt, answer=answer, target=target, meta={"kind": kind})


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    return _example(rng, _ADD, "add", [f"{a} + {b} = {a + b}"], a + b, {"a": a, "b": b})


def _sub(rng: random.Random) -> Example:
    a = rng.randint(10, 49)
    b = rng.randint(1, a - 1)
    return _example(rng, _SUB, "sub", [f"{a} - {b} = {a - b}"], a - b, {"a": a, "b": b})


def _mul(rng: random.Random) -> Example:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return _example(rng, _MUL, "mul", [f"{a} * {b} = {a * b}"], a * b, {"a": a, "b": b})


def _div(rng: random.Random) -> Example:
    b, q = rng.randint(2, 9), rng.randint(2, 11)
    t = b * q
    return _example(rng, _DIV, "div", [f"{t} / {b} = {q}"], q, {"t": t, "b": b})


def _add_sub(rng: random.Random) -> Example:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    s = a + b
    c = rng.randint(1, s - 1)
    steps = [f"{a} + {b} = {s}", f"{s} - {c} = {s - c}"]
    return _example(rng, _ADD_SUB, "add_sub", steps, s - c, {"a": a, "b": b, "c": c})


def _sub_add(rng: random.Random) -> Example:
    a = rng.randint(10, 49)
    b = rng.randint(1, a - 1)
    c = rng.randint(2, 49)
    s = a - b
    steps = [f"{a} - {b} = {s}", f"{s} + {c} = {s + c}"]
    return _example(rng, _SUB_ADD, "sub_add", steps, s + c, {"a": a, "b": b, "c": c})


def _add_add(rng: random.Random) -> Example:
    a, b, c = rng.randint(2, 49), rng.randint(2, 49), rng.randint(2, 49)
    s = a + b
    steps = [f"{a} + {b} = {s}", f"{s} + {c} = {s + c}"]
    return _example(rng, _ADD_ADD, "add_add", steps, s + c, {"a": a, "b": b, "c": c})


def _mul_add(rng: random.Random) -> Example:
    a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 49)
    p = a * b
    steps = [f"{a} * {b} = {p}", f"{p} + {c} = {p + c}"]
    return _example(rng, _MUL_ADD, "mul_add", steps, p + c, {"a": a, "b": b, "c": c})


def _mul_sub(rng: random.Random) -> Example:
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    p = a * b
    c = rng.randint(1, p - 1)
    steps = [f"{a} * {b} = {p}", f"{p} - {c} = {p - c}"]
    return _example(rng, _MUL_SUB, "mul_sub", steps, p - c, {"a": a, "b": b, "c": c})


def _add_div(rng: random.Random) -> Example:
    k, q = rng.randint(2, 9), rng.randint(2, 11)
    t = k * q
    a = rng.randint(1, t - 1)
    b = t - a
    steps = [f"{a} + {b} = {t}", f"{t} / {k} = {q}"]
    return _example(rng, _ADD_DIV, "add_div", steps, q, {"a": a, "b": b, "k": k})


_GENERATORS: dict[str, tuple[Callable[[random.Random], Example], ...]] = {
    "easy": (_add, _sub, _mul, _div),
    "medium": (_add_sub, _sub_add, _add_add, _mul_add, _mul_sub, _add_div),
}


def make_problem(rng: random.Random, difficulty: str = "easy") -> Example:
    """One random problem of the given difficulty, its kind chosen uniformly."""
    return rng.choice(_GENERATORS[difficulty])(rng)


class ArithmeticTask(Task):
    """Short arithmetic word problems; reward 1.0 when the final answer equals the gold number."""

    name = "arithmetic"
    system_prompt = SYSTEM_PROMPT

    def __init__(self, cfg: TaskConfig) -> None:
        reject_unknown_options(self.name, cfg.options, _KNOWN_OPTIONS)
        self.difficulty = str(cfg.options.get("difficulty", "easy"))
        if self.difficulty not in DIFFICULTIES:
            raise EssaError(f"task.options.difficulty must be one of {', '.join(DIFFICULTIES)} "
                            f"(got {self.difficulty!r})")
        self._splits = build_splits(
            split_sizes(cfg), lambda rng: make_problem(rng, self.difficulty),
            seed=f"arithmetic/{self.difficulty}/{cfg.seed}",
        )

    def split(self, name: str) -> list[Example]:
        return pick_split(self._splits, name)

    def reward(self, completion: str, example: Example) -> float:
        return numeric_reward(completion, example.answer)

