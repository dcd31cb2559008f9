"""A tiny graded task that Ray workers load by file path (`tests/ray_tasks.py:make_vowel_task`)."""

from __future__ import annotations

import os

from essa.tasks import Example, Task


class VowelTask(Task):
    """Reward = share of vowels in the completion: graded, so candidates get different fitness.

    With `die_once_file` set, the first reward call that finds that file deletes it and kills its
    own process: a worker dying in the middle of a generation, exactly once across all workers.
    """

    name = "vowels"

    def __init__(self, die_once_file: str | None = None):
        self.die_once_file = die_once_file

    def split(self, name):
        offset = {"sft": 0, "train": 100, "validation": 200, "test": 300}[name]
        return [Example(prompt=f"say {offset + i}", answer=None) for i in range(6)]

    def reward(self, completion, example):
        if self.die_once_file is not None:
            try:
                os.unlink(self.die_once_file)
            except FileNotFoundError:
                pass
            else:
                os._exit(1)
        return sum(c in "aeiou" for c in completion) / max(len(completion), 1)


def make_vowel_task(cfg) -> VowelTask:
    return VowelTask(**cfg.options)
