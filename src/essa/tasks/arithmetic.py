"""Arithmetic word problems, generated offline from templates, with an exact-answer reward.

Small numbers and one or two operations keep problems learnable by a short LoRA SFT of a
~100M-parameter model, and keep completions short: the SFT target is one line such as
"17 + 25 = 42. The answer is \\boxed{42}.".

Options (`task.options`): `difficulty` = "easy" (default: one operation) or "medium" (two).

A problem is its operation(s) and operands, its *key* (("add", 17, 25); the operands of a sum or
product are unordered); names, objects and wording are only its dress. Splits are disjoint by
key, not by prompt text: a held-out problem never comes back in training data under other names
with the same solution line. Each split has the same mix of kinds and draws its keys from its
own seeded stream, in the order test, validation, train, sft, so the held-out sets do not move
when the SFT or train sizes change.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from essa.errors import EssaError
from essa.tasks.answers import numeric_reward
from essa.tasks.base import Example, Task
from essa.tasks.data import reject_unknown_options
from essa.tasks.splits import FILL_ORDER, pick_split, split_sizes

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


@dataclass(frozen=True)
class Kind:
    """One kind of problem: how to draw a key (operands) and how to dress it as a word problem."""

    name: str
    templates: tuple[str, ...]
    draw: Callable[[random.Random], tuple[int, ...]]  # operands, in the key's canonical order
    solve: Callable[..., tuple[list[str], int, dict[str, int]]]  # operands -> steps, answer, template fields
    commutative: bool = False  # the first operation's two operands may appear in either order

    def render(self, rng: random.Random, operands: tuple[int, ...]) -> Example:
        if self.commutative and rng.random() < 0.5:
            operands = (operands[1], operands[0], *operands[2:])
        steps, answer, fields = self.solve(*operands)
        prompt = rng.choice(self.templates).format(**_context(rng), **fields)
        target = " ".join(f"{s}." for s in steps) + f" The answer is \\boxed{{{answer}}}."
        return Example(prompt=prompt, answer=answer, target=target,
                       meta={"kind": self.name, "problem": (self.name, *self.key(operands))})

    def key(self, operands: tuple[int, ...]) -> tuple[int, ...]:
        if self.commutative:
            return (*sorted(operands[:2]), *operands[2:])
        return operands


def _pair(rng: random.Random, low: int, high: int) -> tuple[int, int]:
    a, b = rng.randint(low, high), rng.randint(low, high)
    return (min(a, b), max(a, b))


def _less(rng: random.Random, low: int, high: int) -> tuple[int, int]:
    """(a, b) with a in [low, high] and 1 <= b < a."""
    a = rng.randint(low, high)
    return a, rng.randint(1, a - 1)


def _mul_operands(rng: random.Random) -> tuple[int, int]:
    # A times-table factor and a larger one: "buys 7 boxes of 23".
    a, b = rng.randint(2, 12), rng.randint(2, 99)
    return (min(a, b), max(a, b))


def _div_operands(rng: random.Random) -> tuple[int, int]:
    return rng.randint(2, 12), rng.randint(2, 99)  # divisor, quotient


def _add_sub_operands(rng: random.Random) -> tuple[int, int, int]:
    a, b = _pair(rng, 2, 49)
    return a, b, rng.randint(1, a + b - 1)


def _sub_add_operands(rng: random.Random) -> tuple[int, int, int]:
    return (*_less(rng, 10, 49), rng.randint(2, 49))


def _mul_sub_operands(rng: random.Random) -> tuple[int, int, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    return a, b, rng.randint(1, a * b - 1)


def _add_div_operands(rng: random.Random) -> tuple[int, int, int]:
    k, q = rng.randint(2, 9), rng.randint(2, 11)
    a = rng.randint(1, k * q - 1)
    return a, k * q - a, k


_EASY = (
    Kind("add", _ADD, lambda r: _pair(r, 2, 49),
         lambda a, b: ([f"{a} + {b} = {a + b}"], a + b, {"a": a, "b": b}), commutative=True),
    Kind("sub", _SUB, lambda r: _less(r, 10, 49),
         lambda a, b: ([f"{a} - {b} = {a - b}"], a - b, {"a": a, "b": b})),
    Kind("mul", _MUL, _mul_operands,
         lambda a, b: ([f"{a} * {b} = {a * b}"], a * b, {"a": a, "b": b}), commutative=True),
    Kind("div", _DIV, _div_operands,
         lambda b, q: ([f"{b * q} / {b} = {q}"], q, {"t": b * q, "b": b})),
)
_MEDIUM = (
    Kind("add_sub", _ADD_SUB, _add_sub_operands,
         lambda a, b, c: ([f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"], a + b - c,
                          {"a": a, "b": b, "c": c}), commutative=True),
    Kind("sub_add", _SUB_ADD, _sub_add_operands,
         lambda a, b, c: ([f"{a} - {b} = {a - b}", f"{a - b} + {c} = {a - b + c}"], a - b + c,
                          {"a": a, "b": b, "c": c})),
    Kind("add_add", _ADD_ADD, lambda r: (*_pair(r, 2, 49), r.randint(2, 49)),
         lambda a, b, c: ([f"{a} + {b} = {a + b}", f"{a + b} + {c} = {a + b + c}"], a + b + c,
                          {"a": a, "b": b, "c": c}), commutative=True),
    Kind("mul_add", _MUL_ADD, lambda r: (r.randint(2, 9), r.randint(2, 12), r.randint(2, 49)),
         lambda a, b, c: ([f"{a} * {b} = {a * b}", f"{a * b} + {c} = {a * b + c}"], a * b + c,
                          {"a": a, "b": b, "c": c})),
    Kind("mul_sub", _MUL_SUB, _mul_sub_operands,
         lambda a, b, c: ([f"{a} * {b} = {a * b}", f"{a * b} - {c} = {a * b - c}"], a * b - c,
                          {"a": a, "b": b, "c": c})),
    Kind("add_div", _ADD_DIV, _add_div_operands,
         lambda a, b, k: ([f"{a} + {b} = {a + b}", f"{a + b} / {k} = {(a + b) // k}"], (a + b) // k,
                          {"a": a, "b": b, "k": k})),
)
KINDS: dict[str, tuple[Kind, ...]] = {"easy": _EASY, "medium": _MEDIUM}


def make_problem(rng: random.Random, difficulty: str = "easy") -> Example:
    """One random problem of the given difficulty, its kind chosen uniformly."""
    kind = rng.choice(KINDS[difficulty])
    return kind.render(rng, kind.draw(rng))


def keyed_splits(sizes: dict[str, int], kinds: tuple[Kind, ...], seed: str) -> dict[str, list[Example]]:
    """Splits disjoint by problem key, each with the same mix of kinds (filled in FILL_ORDER).

    Raises EssaError when a kind has too few distinct problems for the sizes asked.
    """
    taken: set[tuple] = set()
    out: dict[str, list[Example]] = {}
    for split in FILL_ORDER:
        size = sizes.get(split, 0)
        rng = random.Random(f"{seed}/{split}")
        examples = []
        for i in range(size):
            kind = kinds[i % len(kinds)]
            operands = _fresh_operands(kind, rng, taken, split)
            examples.append(kind.render(rng, operands))
        rng.shuffle(examples)
        out[split] = examples
    return out


def _fresh_operands(kind: Kind, rng: random.Random, taken: set[tuple], split: str) -> tuple[int, ...]:
    # Rejection sampling: keys are drawn uniformly; many misses in a row mean the kind is used up.
    for _ in range(20_000):
        operands = kind.draw(rng)
        key = (kind.name, *kind.key(operands))
        if key not in taken:
            taken.add(key)
            return operands
    raise EssaError(f"arithmetic: ran out of distinct '{kind.name}' problems while filling split '{split}' "
                    f"({sum(k[0] == kind.name for k in taken)} used): lower the split sizes")


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
        self._splits = keyed_splits(split_sizes(cfg), KINDS[self.difficulty],
                                    seed=f"arithmetic/{self.difficulty}/{cfg.seed}")

    def split(self, name: str) -> list[Example]:
        return pick_split(self._splits, name)

    def reward(self, completion: str, example: Example) -> float:
        return numeric_reward(completion, example.answer)

