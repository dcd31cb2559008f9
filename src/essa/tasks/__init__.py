"""Task registry: built-in tasks by name, plus user tasks from a Python file or an entry point.

`task.name` in the config may be
- a registered name (`arithmetic`, ...),
- `path/to/file.py:factory` - a Python file defining `factory(cfg: TaskConfig) -> Task`,
- `module.sub:factory` - an importable module attribute,
- any name published under the `essa.tasks` entry-point group by an installed package.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from essa.errors import EssaError
from essa.tasks.base import SPLITS, Example, RewardStats, Task, format_prompt, safe_reward

if TYPE_CHECKING:
    from essa.config import TaskConfig

TaskFactory = Callable[["TaskConfig"], Task]

_REGISTRY: dict[str, TaskFactory] = {}
_BUILTINS = {
    "arithmetic": "essa.tasks.arithmetic:ArithmeticTask",
    "gsm8k": "essa.tasks.gsm8k:Gsm8kTask",
    "math": "essa.tasks.math_task:MathTask",
    "ifeval": "essa.tasks.ifeval:IfevalTask",
    "reward_model": "essa.tasks.reward_model:RewardModelTask",
    "helpsteer2": "essa.tasks.reward_model:HelpSteer2Task",
    "dataset": "essa.tasks.dataset:dataset_task",
}

__all__ = [
    "SPLITS", "Example", "RewardStats", "Task", "TaskFactory", "format_prompt", "safe_reward",
    "register_task", "get_task", "available_tasks",
]


def register_task(name: str, factory: TaskFactory) -> None:
    """Make `factory(cfg) -> Task` available as `task.name: NAME`."""
    _REGISTRY[name] = factory


def available_tasks() -> list[str]:
    names = set(_REGISTRY) | set(_BUILTINS)
    names |= {ep.name for ep in entry_points(group="essa.tasks")}
    return sorted(names)


def get_task(cfg: TaskConfig) -> Task:
    factory = _resolve(cfg.name)
    try:
        task = factory(cfg)
    except EssaError:
        raise
    except TypeError as exc:
        raise EssaError(f"task '{cfg.name}' could not be built from its options: {exc}") from exc
    if not isinstance(task, Task):
        raise EssaError(f"task factory for '{cfg.name}' returned {type(task).__name__}, not an essa Task")
    return task


def _resolve(name: str) -> TaskFactory:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTINS:
        return _load_attr(_BUILTINS[name], name)
    for ep in entry_points(group="essa.tasks"):
        if ep.name == name:
            return ep.load()
    if ":" in name:
        return _load_attr(name, name)
    raise EssaError(f"unknown task '{name}' (available: {', '.join(available_tasks())}; "
                    "or give path/to/file.py:factory)")


def _load_attr(spec: str, name: str) -> TaskFactory:
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise EssaError(f"task file not found: {path}")
            mod_spec = importlib.util.spec_from_file_location(f"essa_user_task_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except EssaError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code: report, don't dump a traceback
        raise EssaError(f"could not load task '{name}': {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, attr):
        raise EssaError(f"task '{name}': {target} has no attribute '{attr}'")
    return getattr(module, attr)
