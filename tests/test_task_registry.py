"""Task registry: built-ins, user tasks from a file (the README's worked example) or a module."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from essa.config import TaskConfig
from essa.errors import EssaError
from essa.evaluate import score
from essa.tasks import Example, RewardStats, Task, get_task, register_task, safe_reward

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_task_source() -> str:
    text = README.read_text()
    match = re.search(r"Put this in `my_task.py`:\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its custom-task example"
    return match.group(1)


def test_readme_custom_task_loads_from_file(tmp_path):
    path = tmp_path / "my_task.py"
    path.write_text(readme_task_source())
    task = get_task(TaskConfig(name=f"{path}:Capitals"))
    assert task.name == "capitals"
    test = task.checked_split("test")
    assert task.reward("It is Lima.", test[0]) == 1.0
    assert task.reward("Paris", test[0]) == 0.0
    prompts = [ex.prompt for split in ("sft", "train", "validation", "test") for ex in task.split(split)]
    assert len(prompts) == len(set(prompts))


def test_registered_task_by_name():
    class One(Task):
        name = "one"

        def __init__(self, cfg):
            self.size = cfg.test_size

        def split(self, name):
            return [Example(prompt=f"{name} {i}") for i in range(self.size)]

        def reward(self, completion, example):
            return 1.0

    register_task("one-for-test", One)
    assert len(get_task(TaskConfig(name="one-for-test", test_size=3)).split("test")) == 3


def test_unknown_task_and_bad_factory_are_clear_errors(tmp_path):
    with pytest.raises(EssaError, match="unknown task 'nope'"):
        get_task(TaskConfig(name="nope"))
    with pytest.raises(EssaError, match="task file not found"):
        get_task(TaskConfig(name=f"{tmp_path / 'missing.py'}:T"))
    bad = tmp_path / "bad.py"
    bad.write_text("def make(cfg):\n    return 42\n")
    with pytest.raises(EssaError, match="not an essa Task"):
        get_task(TaskConfig(name=f"{bad}:make"))
    with pytest.raises(EssaError, match="has no attribute"):
        get_task(TaskConfig(name=f"{bad}:other"))


class Flaky(Task):
    name = "flaky"

    def split(self, name):
        return [Example(prompt=str(i)) for i in range(3)]

    def reward(self, completion, example):
        if completion == "raise":
            raise ValueError("checker crashed")
        if completion == "nan":
            return math.nan
        return 1.0


def test_failing_or_nan_reward_scores_zero_and_is_counted():
    task, stats = Flaky(), RewardStats()
    examples = task.split("test")
    rewards = score(task, [["ok", "raise", "nan"], ["ok", "ok", "ok"]], examples, stats)
    assert rewards.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert stats.failures == 2 and stats.last_error is not None
    assert safe_reward(task, "ok", examples[0]) == 1.0


def test_empty_split_is_a_clear_error():
    with pytest.raises(EssaError, match="empty 'train' split"):
        get_task(TaskConfig(train_size=0)).checked_split("train")
    with pytest.raises(EssaError, match="unknown split"):
        get_task(TaskConfig()).checked_split("dev")
