"""A tiny graded task that Ray workers load by file path (`tests/ray_tasks.py:make_vowel_task`)."""

from __future__ import annotations

import os
import time

from essa.tasks import Example, Task


class VowelTask(Task):
    """Reward = share of vowels in the completion: graded, so candidates get different fitness.

    With `die_once_file` set, the first reward call that finds that file deletes it and kills its
    own process: a worker dying in the middle of a generation, exactly once across all workers.
    With `hang_once_file`, that call hangs instead (alive, but never answering).
    """

    name = "vowels"

    def __init__(self, die_once_file: str | None = None, hang_once_file: str | None = None):
        self.die_once_file = die_once_file
        self.hang_once_file = hang_once_file

    def split(self, name):
        offset = {"sft": 0, "train": 100, "validation": 200, "test": 300}[name]
        return [Example(prompt=f"say {offset + i}", answer=None) for i in range(6)]

    def reward(self, completion, example):
        if _took(self.die_once_file):
            os._exit(1)
        if _took(self.hang_once_file):
            time.sleep(3600)
        return sum(c in "aeiou" for c in completion) / max(len(completion), 1)


def _took(path: str | None) -> bool:
    """True for the one caller that deletes the file at `path` (across processes)."""
    if path is None:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def make_vowel_task(cfg) -> VowelTask:
    return VowelTask(**cfg.options)
