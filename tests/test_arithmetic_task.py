"""Answer extraction and the arithmetic word-problem task."""

from __future__ import annotations

import random
import re

import pytest

from essa.config import TaskConfig
from essa.errors import EssaError
from essa.tasks import SPLITS, Example, get_task
from essa.tasks.answers import extract_boxed, final_answer, numeric_reward, parse_number
from essa.tasks.arithmetic import KINDS, ArithmeticTask, make_problem
from essa.tasks.splits import build_splits
from task_helpers import assert_held_out_by_problem

SMALL = dict(sft_size=300, train_size=200, validation_size=50, test_size=80)


def small_task(seed: int = 0, **options) -> ArithmeticTask:
    return ArithmeticTask(TaskConfig(name="arithmetic", seed=seed, options=options, **SMALL))


# ---- answers.py -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, boxes", [
    ("so \\boxed{42}.", ["42"]),
    ("\\boxed{1} then \\boxed{2}", ["1", "2"]),
    ("\\boxed{\\frac{1}{2}}", ["\\frac{1}{2}"]),
    ("\\boxed{{7}}", ["{7}"]),
    ("\\boxed {5}", ["5"]),
    ("\\boxed 42 apples", ["42"]),
    ("\\boxed{3} and \\boxed{4", ["3"]),  # unterminated second box is ignored
    ("\\boxed{", []),
    ("\\boxed", []),
    ("", []),
])
def test_extract_boxed(text, boxes):
    assert extract_boxed(text) == boxes


@pytest.mark.parametrize("text, answer", [
    ("17 + 25 = 42. The answer is \\boxed{42}.", "42"),
    ("first \\boxed{10}, on second thought \\boxed{12}", "12"),
    ("\\boxed{\\text{5}} plus noise 99", "\\text{5}"),
    ("\\boxed{} then 7", "7"),  # an empty box does not count
    ("17 + 25 = 42. So 42 apples in all", "42"),
    ("#### 1,234", "1,234"),
    ("The answer is $12. Check: 6 + 6 = 12 and 3", "12"),  # the phrase beats the last number
    ("we compute 5-3", "3"),  # a minus between digits is not a sign
    ("it is -3", "-3"),
    ("", None),
    ("   ", None),
    ("no digits at all", None),
    ("\\boxed{", None),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


@pytest.mark.parametrize("text, value", [
    ("42", 42.0), ("1,234", 1234.0), ("$12", 12.0), ("\\$1,000.50", 1000.5), ("12.0", 12.0),
    ("12%", 12.0), ("12\\%", 12.0), ("-3", -3.0), ("\u22123", -3.0), ("1/2", 0.5),
    ("\\frac{3}{4}", 0.75), ("\\dfrac{-1}{4}", -0.25), ("42.", 42.0), ("42 apples", 42.0),
    ("17 + 25 = 42", 42.0), ("\\text{8}", 8.0), (" 7 ", 7.0), ("{7}", 7.0),
])
def test_parse_number(text, value):
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", [None, "", "abc", "1/0", "3 or 4", "1,5", "1e400"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("completion, gold, reward", [
    ("17 + 25 = 42. The answer is \\boxed{42}.", 42, 1.0),
    ("17 + 25 = 32. The answer is \\boxed{32}.", 42, 0.0),
    ("\\boxed{42} no wait \\boxed{43}", 42, 0.0),  # last box wins
    ("\\boxed{41} no wait \\boxed{42}", 42, 1.0),
    ("\\boxed{42.0}", 42, 1.0),
    ("\\boxed{42.01}", 42, 0.0),
    ("\\boxed{$1,234}", 1234, 1.0),
    ("\\boxed{\\frac{1}{2}}", "1/2", 1.0),
    ("The total is 40 + 2 = 42", 42, 1.0),  # fallback: last number
    ("#### 42", 42, 1.0),
    ("\\boxed{", 42, 0.0),
    ("", 42, 0.0),
    ("I do not know", 42, 0.0),
    (None, 42, 0.0),
    ("\\boxed{42}", "not a number", 0.0),
])
def test_numeric_reward(completion, gold, reward):
    assert numeric_reward(completion, gold) == reward


# ---- splits -----------------------------------------------------------------------------------

def all_prompts(task) -> list[str]:
    return [e.prompt for s in SPLITS for e in task.split(s)]


@pytest.mark.parametrize("difficulty", ["easy", "medium"])
def test_splits_sizes_and_disjoint(difficulty):
    task = small_task(difficulty=difficulty)
    for split in SPLITS:
        assert len(task.split(split)) == SMALL[f"{split}_size"]
    prompts = all_prompts(task)
    assert len(prompts) == len(set(prompts))
    by_split = {s: {e.prompt for e in task.split(s)} for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not by_split[a] & by_split[b], (a, b)


@pytest.mark.parametrize("difficulty", ["easy", "medium"])
def test_held_out_problems_never_appear_in_training_under_other_names(difficulty):
    # The demo's sizes: 1,000 test problems, none of them (operation and operands) seen in SFT/train.
    task = ArithmeticTask(TaskConfig(sft_size=128, train_size=800, validation_size=300, test_size=1000,
                                     options={"difficulty": difficulty}))
    assert_held_out_by_problem(task)
    kinds = [e.meta["kind"] for e in task.split("test")]
    assert max(kinds.count(k) for k in set(kinds)) - min(kinds.count(k) for k in set(kinds)) <= 1


def test_a_sum_is_one_problem_whatever_its_order_or_dress():
    kind = KINDS["easy"][0]
    a = kind.render(random.Random(1), (17, 25))
    b = kind.render(random.Random(2), (25, 17))
    assert a.prompt != b.prompt and a.meta["problem"] == b.meta["problem"] == ("add", 17, 25)


def test_too_many_problems_of_a_kind_is_a_clear_error():
    with pytest.raises(EssaError, match="ran out of distinct 'mul' problems"):
        ArithmeticTask(TaskConfig(sft_size=0, train_size=0, validation_size=0, test_size=4600))


def test_deterministic_per_seed_and_seeds_differ():
    assert all_prompts(small_task(3)) == all_prompts(small_task(3))
    assert small_task(3).split("sft") == small_task(3).split("sft")
    assert set(small_task(3).split("test")) != set(small_task(4).split("test"))
    assert small_task(3).split("test") != small_task(3, difficulty="medium").split("test")


def test_held_out_splits_do_not_move_with_sft_size():
    held_out = dict(seed=1, validation_size=20, test_size=30)
    a = ArithmeticTask(TaskConfig(sft_size=10, train_size=5, **held_out))
    b = ArithmeticTask(TaskConfig(sft_size=500, train_size=100, **held_out))
    assert a.split("test") == b.split("test")
    assert a.split("validation") == b.split("validation")


def test_zero_size_split_is_empty():
    task = ArithmeticTask(TaskConfig(sft_size=0, train_size=5, validation_size=0, test_size=5))
    assert task.split("sft") == [] and task.split("validation") == []
    with pytest.raises(EssaError, match="empty 'sft' split"):
        task.checked_split("sft")


def test_build_splits_raises_when_prompts_run_out():
    def make(rng: random.Random) -> Example:  # only 5 distinct prompts exist
        n = rng.randint(1, 5)
        return Example(prompt=f"what is {n}?", answer=n, target=f"\\boxed{{{n}}}")

    splits = build_splits({"sft": 1, "train": 1, "validation": 1, "test": 2}, make, seed="s")
    assert sum(len(v) for v in splits.values()) == 5
    with pytest.raises(EssaError, match="distinct problems"):
        build_splits({"sft": 3, "train": 1, "validation": 1, "test": 2}, make, seed="s")


@pytest.mark.parametrize("options, cfg_kwargs, message", [
    ({"difficulty": "hard"}, {}, "difficulty"),
    ({"level": 2}, {}, "unknown option"),
    ({}, {"test_size": -1}, "test_size"),
])
def test_bad_config_raises(options, cfg_kwargs, message):
    with pytest.raises(EssaError, match=message):
        get_task(TaskConfig(name="arithmetic", options=options, **cfg_kwargs))


# ---- targets agree with the prompt and the reward ----------------------------------------------

_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
        "/": lambda a, b: a / b}


@pytest.mark.parametrize("difficulty, n_steps", [("easy", 1), ("medium", 2)])
def test_targets_are_correct_and_score_one(difficulty, n_steps):
    task = small_task(difficulty=difficulty)
    for ex in (e for s in SPLITS for e in task.split(s)):
        target = task.sft_target(ex)
        assert task.reward(target, ex) == 1.0
        assert task.reward(target.replace(f"{{{ex.answer}}}", f"{{{ex.answer + 1}}}"), ex) == 0.0
        steps = _STEP.findall(target)
        assert len(steps) == n_steps, target
        prompt_numbers = [int(n) for n in re.findall(r"\d+", ex.prompt)]
        known = list(prompt_numbers)
        for a, op, b, result in steps:
            assert int(a) in known and int(b) in known, (ex.prompt, target)
            assert _OPS[op](int(a), int(b)) == int(result), target
            known.append(int(result))
        # every number given in the problem is used by the worked answer
        assert set(prompt_numbers) <= {int(x) for a, _, b, _ in steps for x in (a, b)}, ex.prompt
        assert int(steps[-1][3]) == ex.answer > 0
        assert len(target) <= 60  # one short line


def test_all_kinds_appear():
    kinds = {e.meta["kind"] for e in small_task().split("sft")}
    assert kinds == {"add", "sub", "mul", "div"}
    kinds = {e.meta["kind"] for e in small_task(difficulty="medium").split("sft")}
    assert kinds == {"add_sub", "sub_add", "add_add", "mul_add", "mul_sub", "add_div"}


def test_make_problem_is_deterministic():
    assert make_problem(random.Random(5)) == make_problem(random.Random(5))


def test_through_registry_with_chat_messages():
    task = get_task(TaskConfig(name="arithmetic", seed=2, sft_size=4, train_size=4,
                               validation_size=4, test_size=4))
    assert isinstance(task, ArithmeticTask)
    ex = task.checked_split("train")[0]
    messages = task.messages(ex)
    assert messages[0]["role"] == "system" and "\\boxed{}" in messages[0]["content"]
    assert messages[1] == {"role": "user", "content": ex.prompt}
    assert task.reward(f"The answer is \\boxed{{{ex.answer}}}.", ex) == 1.0
    assert task.reward(f"The answer is \\boxed{{{ex.answer + 3}}}.", ex) == 0.0
