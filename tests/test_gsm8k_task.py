"""The GSM8K task: gold answers and targets, file and procedural splits, the numeric reward."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from essa.config import TaskConfig
from essa.errors import EssaError
from essa.tasks import SPLITS, Example, RewardStats, get_task, safe_reward
from essa.tasks.gsm8k import Gsm8kTask, format_number, gsm8k_gold, solution_target
from task_helpers import assert_disjoint, assert_held_out_by_problem, write_jsonl

SMALL = {"sft_size": 40, "train_size": 30, "validation_size": 10, "test_size": 12}


def gsm_row(i: int) -> dict:
    """A GSM8K-shaped row whose answer is 3 * i + 2, with calculator annotations."""
    return {
        "question": f"Tom has {i} bags with 3 apples each and 2 more apples. How many apples?",
        "answer": f"He has {i}*3=<<{i}*3={3 * i}>>{3 * i} apples in bags.\n"
                  f"In all {3 * i}+2=<<{3 * i}+2={3 * i + 2}>>{3 * i + 2} apples.\n"
                  f"#### {3 * i + 2}",
    }


@pytest.fixture
def gsm_files(tmp_path: Path) -> tuple[Path, Path]:
    train = [gsm_row(i) for i in range(1, 121)]
    train.append(gsm_row(5))  # a duplicate question: kept once
    train.append(gsm_row(1000))  # also in the test file: must not leave the test split
    test = [gsm_row(i) for i in range(1000, 1020)]
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "test.jsonl", test)


def file_task(files: tuple[Path, Path], seed: int = 0, **sizes) -> Gsm8kTask:
    train, test = files
    cfg = TaskConfig(name="gsm8k", seed=seed, options={"train_file": str(train),
                                                       "test_file": str(test)},
                     **{**SMALL, **sizes})
    return Gsm8kTask(cfg)


# ---- gold answers and targets -----------------------------------------------------------------

@pytest.mark.parametrize("text, gold", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", 72),
    ("#### 1,234", 1234),
    ("a\n####  -5\n", -5),
    ("#### 12.5", 12.5),
    ("first #### 3\nthen\n#### 4", 4),  # the last #### line is the answer
    ("no final line 42", None),
    ("#### many", None),
    ("", None),
])
def test_gsm8k_gold(text, gold):
    assert gsm8k_gold(text) == gold


@pytest.mark.parametrize("value, text", [(72, "72"), (72.0, "72"), (-3, "-3"), (5906.25, "5906.25"),
                                         (1e6, "1000000")])
def test_format_number(value, text):
    assert format_number(value) == text


def test_solution_target_strips_calculator_notes_and_boxes_the_answer():
    answer = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "48+24 = <<48+24=72>>72 clips.\n#### 72")
    target = solution_target(answer, 72)
    assert target == ("Natalia sold 48/2 = 24 clips in May.\n48+24 = 72 clips.\n"
                      "The answer is \\boxed{72}.")


# ---- the reward -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task() -> Gsm8kTask:
    return Gsm8kTask(TaskConfig(name="gsm8k", seed=0, **SMALL))


@pytest.mark.parametrize("completion, reward", [
    ("3 * 4 = 12, plus 6 is 18. The answer is \\boxed{18}.", 1.0),
    ("\\boxed{18.0}", 1.0),
    ("\\boxed{\\$18}", 1.0),
    ("\\boxed{17}", 0.0),  # wrong
    ("\\boxed{18} hmm, no: \\boxed{19}", 0.0),  # the last box wins
    ("\\boxed{19} hmm, no: \\boxed{18}", 1.0),
    ("so the total is 12 + 6 = 18", 1.0),  # no box: documented fallback, the last number
    ("#### 18", 1.0),
    ("the answer is 18, since 9 + 9 = 18 and 1 left", 1.0),  # "answer is N" beats the last number
    ("\\boxed{18", 1.0),  # unterminated box: ignored, fallback finds 18
    ("\\boxed{1", 0.0),
    ("\\boxed{}", 0.0),
    ("", 0.0),
    ("   ", 0.0),
    ("no idea", 0.0),
    ("\\boxed{nan}", 0.0),
    ("\\boxed{inf}", 0.0),
    ("\\boxed{1e400}", 0.0),
    ("}}{{\\boxed\\boxed{{", 0.0),
    (None, 0.0),
    (18, 0.0),  # not text
])
def test_reward(task, completion, reward):
    example = Example(prompt="p", answer=18)
    assert task.reward(completion, example) == reward


def test_reward_never_raises_and_safe_reward_counts_nothing(task):
    stats = RewardStats()
    example = task.split("test")[0]
    for junk in ("\\boxed{" * 500, "9" * 5000, "\x00\\boxed{\x00}", "-" * 100 + "1"):
        assert safe_reward(task, junk, example, stats) == 0.0
    assert stats.failures == 0


# ---- procedural source ------------------------------------------------------------------------

def test_procedural_splits_sizes_disjoint_and_deterministic(task):
    for split in SPLITS:
        assert len(task.split(split)) == SMALL[f"{split}_size"]
    assert_disjoint(task)
    assert_held_out_by_problem(task)  # by template and numbers, not only prompt text
    again = Gsm8kTask(TaskConfig(name="gsm8k", seed=0, **SMALL))
    assert [e.prompt for e in again.split("train")] == [e.prompt for e in task.split("train")]
    other = Gsm8kTask(TaskConfig(name="gsm8k", seed=1, **SMALL))
    assert {e.prompt for e in other.split("test")} != {e.prompt for e in task.split("test")}


def test_procedural_held_out_does_not_move_with_sft_size():
    a = Gsm8kTask(TaskConfig(name="gsm8k", seed=3, **{**SMALL, "sft_size": 5}))
    b = Gsm8kTask(TaskConfig(name="gsm8k", seed=3, **{**SMALL, "sft_size": 60}))
    assert a.split("test") == b.split("test") and a.split("validation") == b.split("validation")


def test_procedural_examples_are_gsm8k_like_and_targets_score_one(task):
    for example in (e for s in SPLITS for e in task.split(s)):
        assert len(example.prompt) > 40
        assert "Do not include units" not in example.prompt
        target = task.sft_target(example)
        assert "####" not in target and "<<" not in target
        assert target.endswith(f"The answer is \\boxed{{{format_number(example.answer)}}}.")
        assert task.reward(target, example) == 1.0
        wrong = target.replace(f"\\boxed{{{format_number(example.answer)}}}",
                               f"\\boxed{{{format_number(example.answer + 1)}}}")
        assert task.reward(wrong, example) == 0.0
    messages = task.messages(task.split("train")[0])
    assert messages[0]["role"] == "system" and "\\boxed{}" in messages[0]["content"]
    assert "step by step" in messages[0]["content"]


# ---- file source ------------------------------------------------------------------------------

def test_file_splits_disjoint_and_from_the_right_file(gsm_files):
    task = file_task(gsm_files)
    for split in SPLITS:
        assert len(task.split(split)) == SMALL[f"{split}_size"]
    assert_disjoint(task)
    test_prompts = {gsm_row(i)["question"] for i in range(1000, 1020)}
    assert {e.prompt for e in task.split("test")} <= test_prompts
    for split in ("sft", "train", "validation"):
        assert not {e.prompt for e in task.split(split)} & test_prompts, split


def test_train_rows_also_in_the_test_file_are_dropped(tmp_path):
    extras = [gsm_row(i) for i in range(1, 11)]
    train = write_jsonl(tmp_path / "train.jsonl", [gsm_row(i) for i in range(1000, 1005)] + extras)
    test = write_jsonl(tmp_path / "test.jsonl", [gsm_row(i) for i in range(1000, 1020)])
    task = file_task((train, test), sft_size=4, train_size=3, validation_size=3, test_size=5)
    used = {e.prompt for s in ("sft", "train", "validation") for e in task.split(s)}
    assert used == {row["question"] for row in extras}
    assert_disjoint(task)


def test_file_examples_gold_and_targets(gsm_files):
    task = file_task(gsm_files)
    for example in (e for s in SPLITS for e in task.split(s)):
        i = int(re.match(r"Tom has (\d+) bags", example.prompt).group(1))
        assert example.answer == 3 * i + 2
        target = task.sft_target(example)
        assert target == (f"He has {i}*3={3 * i} apples in bags.\nIn all {3 * i}+2={3 * i + 2} "
                          f"apples.\nThe answer is \\boxed{{{3 * i + 2}}}.")
        assert task.reward(target, example) == 1.0


def test_file_partition_seeded_and_validation_stable(gsm_files):
    a = file_task(gsm_files, seed=0)
    b = file_task(gsm_files, seed=0, sft_size=5, train_size=60)
    c = file_task(gsm_files, seed=1)
    assert a.split("validation") == b.split("validation")
    assert a.split("test") == b.split("test")
    assert a.split("train") == file_task(gsm_files, seed=0).split("train")
    assert [e.prompt for e in a.split("train")] != [e.prompt for e in c.split("train")]


def test_all_held_out_rows_when_test_size_matches(gsm_files):
    task = file_task(gsm_files, test_size=20)
    assert len({e.prompt for e in task.split("test")}) == 20


def test_only_needed_file_is_read(tmp_path, gsm_files):
    train, _ = gsm_files
    cfg = TaskConfig(name="gsm8k", options={"train_file": str(train),
                                            "test_file": str(tmp_path / "missing.jsonl")},
                     **{**SMALL, "test_size": 0})
    assert Gsm8kTask(cfg).split("test") == []


def test_missing_field_names_file_and_line(tmp_path):
    rows = [gsm_row(1), gsm_row(2), {"question": "What is 1 + 1?"}]
    bad = write_jsonl(tmp_path / "bad_train.jsonl", rows)
    good_test = write_jsonl(tmp_path / "test.jsonl", [gsm_row(500)])
    with pytest.raises(EssaError, match=r"bad_train\.jsonl.*record 3.*'answer'"):
        file_task((bad, good_test), sft_size=1, train_size=1, validation_size=1, test_size=1)


def test_answer_without_final_line_names_file_and_record(tmp_path):
    rows = [gsm_row(1), {"question": "What is 1 + 1?", "answer": "It is 2."}]
    bad = write_jsonl(tmp_path / "nofinal.jsonl", rows)
    good_test = write_jsonl(tmp_path / "test.jsonl", [gsm_row(500)])
    with pytest.raises(EssaError, match=r"nofinal\.jsonl.*record 2.*####"):
        file_task((bad, good_test), sft_size=1, train_size=0, validation_size=0, test_size=1)


def test_too_few_rows_is_a_clear_error(gsm_files):
    with pytest.raises(EssaError, match=r"train\.jsonl has 120 unique prompts.*lower the split"):
        file_task(gsm_files, sft_size=100, train_size=30)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(EssaError, match="not found"):
        file_task((tmp_path / "nope.jsonl", tmp_path / "nope2.jsonl"))


@pytest.mark.parametrize("options, message", [
    ({"difficulty": "hard"}, "unknown option"),
    ({"source": "web"}, "source must be one of"),
])
def test_bad_options(options, message):
    with pytest.raises(EssaError, match=message):
        Gsm8kTask(TaskConfig(name="gsm8k", options=options, **SMALL))


def test_through_registry_by_module_path(gsm_files):
    train, test = gsm_files
    task = get_task(TaskConfig(name="essa.tasks.gsm8k:Gsm8kTask", options={
        "train_file": str(train), "test_file": str(test)}, **SMALL))
    assert isinstance(task, Gsm8kTask) and task.source == "data"
    assert math.isfinite(task.reward("\\boxed{5}", task.split("test")[0]))


def test_default_data_source_is_openai_gsm8k_main(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        first = 2000 if split == "test" else 1
        return [gsm_row(i) for i in range(first, first + 100)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = Gsm8kTask(TaskConfig(name="gsm8k", options={"source": "data"}, **SMALL))
    assert sorted(calls) == [("openai/gsm8k", "main", "test"), ("openai/gsm8k", "main", "train")]
    assert all(e.answer >= 3 * 2000 + 2 for e in task.split("test"))  # from the test split
    assert_disjoint(task)


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(EssaError, match=r"openai/gsm8k.*Couldn't reach.*local .jsonl"):
        Gsm8kTask(TaskConfig(name="gsm8k", options={"source": "data"}, **SMALL))
