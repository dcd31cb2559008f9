"""A tiny task that Ray workers and `essa train` subprocesses load by file path
(`tests/ray_tasks.py:make_vowel_task`), with switches that make a process die or hang on cue."""

from __future__ import annotations

import os
import time

from essa.tasks import Example, Task


class VowelTask(Task):
    """Reward = share of vowels in the completion: graded, so candidates get different fitness.
    With `any_vowel`, reward = 1 when the completion holds a vowel: accuracy (reward >= 1) then
    differs between candidates too, so validation comparisons are not all zeros.

    With `die_once_file` set, the first reward call that finds that file deletes it and kills its
    own process: a worker dying in the middle of a generation, exactly once across all workers.
    With `hang_once_file`, that call hangs instead (alive, but never answering). With
    `hang_at_call` = n, the process's n-th reward call writes `reached_file` and hangs.
    """

    name = "vowels"

    def __init__(self, die_once_file: str | None = None, hang_once_file: str | None = None, any_vowel: bool = False,
                 hang_at_call: int | None = None, reached_file: str | None = None, validation_examples: int = 6):
        self.die_once_file = die_once_file
        self.hang_once_file = hang_once_file
        self.any_vowel = any_vowel
        self.hang_at_call, self.reached_file = hang_at_call, reached_file
        self.calls = 0
        self.validation_examples = validation_examples  # halved by the final choice: selection, judgement

    def split(self, name):
        offset = {"sft": 0, "train": 100, "validation": 200, "test": 300}[name]
        size = self.validation_examples if name == "validation" else 6
        return [Example(prompt=f"say {offset + i}", answer=None) for i in range(size)]

    def reward(self, completion, example):
        if _took(self.die_once_file):
            os._exit(1)
        self.calls += 1
        if _took(self.hang_once_file):
            time.sleep(3600)
        if self.calls == self.hang_at_call:
            open(self.reached_file, "w").close()
            time.sleep(3600)
        if self.any_vowel:
            return float(any(c in "aeiou" for c in completion))
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
