"""The `dataset` task: prompts from a dataset, fitness from reward functions, the way TRL's
GRPOTrainer reads them.

`essa.ESSATrainer` builds it from `datasets.Dataset` objects (or lists of dicts) and Python
callables; `task.name: dataset` builds it from files or `datasets` ids and `module:function`
specs (`DatasetOptions`, the `task.options` of this task). Either way:

- Every row has a "prompt": plain text, which the model continues as it is (no chat template,
  as in TRL), or a list of chat messages (conversational), which goes through the tokenizer's chat
  template ready for the assistant turn. An optional "completion" (text, or a list holding the
  assistant message) is the target of the LoRA SFT warm start.
- A reward function is called as TRL calls it: `f(prompts=..., completions=..., completion_ids=...,
  trainer_state=None, log_extra=..., log_metric=..., **columns)`, where `columns` are the
  dataset's other columns (all but prompt, completion and completion_ids), one value per
  completion. Completions are strings for plain prompts and `[{"role": "assistant", "content":
  ...}]` lists for conversational ones. It returns one float per completion, or None where it
  does not apply. A function may name only the arguments it uses, or take **kwargs.
- Several functions add up, weighted by `reward_weights` (default 1 each); a completion that no
  function applies to (all None) scores 0. A string instead of a function names a
  sequence-classification reward model (a local directory or a hub id), scored as the
  `reward_model` task scores (its logit 0).
- Splits: train; validation from its own source, else `task.validation_size` prompts held out of
  train (seeded by `task.seed`); test from its own source; sft from its own source, else the train
  rows that have a completion. Unlike the built-in tasks, sft may share prompts with train (as an
  SFT-then-GRPO pipeline on one dataset does); validation and train never do when validation is
  held out.

Functions are checked before anything runs: a signature that asks for an argument neither TRL
nor the dataset supplies, and a trial call on two train rows that returns the wrong number of
values or a non-number, are refused with one EssaError.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from essa.config import build_section, setting
from essa.errors import EssaError, first_line
from essa.tasks.base import SPLITS, Example, Task
from essa.tasks.data import load_records

if TYPE_CHECKING:
    from essa.config import TaskConfig

# Columns TRL does not pass on to reward functions.
NOT_PASSED = ("prompt", "completion", "completion_ids")
# Arguments TRL passes to every reward function besides the dataset's columns.
TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
SOURCES = ("data", "python")
PROBE_ROWS = 2


@dataclass
class DatasetOptions:
    """The `task.options` of `task.name: dataset`."""

    train: str | None = setting(None, "Train prompts: a .jsonl / .json / .parquet file or a `datasets` id, rows "
                                "with a prompt column (text or chat messages).")
    validation: str | None = setting(None, "Validation prompts (null: task.validation_size prompts held out of "
                                     "train).")
    test: str | None = setting(None, "Held-out test prompts (what `essa eval --split test` scores).")
    sft: str | None = setting(None, "SFT examples, rows with prompt and completion (null: the train rows that "
                              "have a completion).")
    train_split: str = setting("train", "Split of a `datasets` id for train.")
    validation_split: str = setting("validation", "Split of a `datasets` id for validation.")
    test_split: str = setting("test", "Split of a `datasets` id for test.")
    sft_split: str = setting("train", "Split of a `datasets` id for sft.")
    config: str | None = setting(None, "Configuration of the `datasets` ids (e.g. main for openai/gsm8k).")
    reward_funcs: list[str] = setting([], "Reward functions with TRL's signature: path/to/file.py:function or "
                                      "module:function; a name without a colon is a sequence-classification "
                                      "reward model (a local directory or a hub id).")
    reward_weights: list[float] | None = setting(None, "Weight of each reward function in their sum (null: 1 "
                                                 "each), as TRL's reward_weights.")
    source: str = setting("data", "data: the sources above. python: written by essa.ESSATrainer, whose datasets "
                          "and reward functions were Python objects (not rebuilt from a config file).")

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise EssaError(f"task.options.source must be one of {', '.join(SOURCES)} (got {self.source!r})")


# -- reward functions ----------------------------------------------------------------------------
class RewardFunction:
    """A reward function with TRL's calling convention, its signature checked once."""

    def __init__(self, func: Callable[..., Any], columns: Sequence[str]) -> None:
        self.func = func
        self.name = reward_name(func)
        self.is_async = inspect.iscoroutinefunction(func)  # other awaitables are caught by the result
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError) as exc:
            raise EssaError(f"reward function {self.name}: cannot read its signature ({first_line(exc)})") from exc
        params = signature.parameters.values()
        self.takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
        supplied = set(TRL_ARGUMENTS) | set(columns)
        for p in params:
            if p.kind is p.POSITIONAL_ONLY and p.default is p.empty:
                raise EssaError(f"reward function {self.name}: parameter '{p.name}' is positional-only; reward "
                                "functions are called with keyword arguments (completions=..., prompts=..., "
                                "one per dataset column)")
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty \
                    and p.name not in supplied:
                raise EssaError(f"reward function {self.name} needs an argument '{p.name}', which is neither a "
                                f"dataset column (columns: {', '.join(columns) or 'none'}) nor one TRL passes "
                                f"({', '.join(TRL_ARGUMENTS)})")
        self.accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not self.takes_all and "completions" not in self.accepted:
            raise EssaError(f"reward function {self.name} takes no 'completions' argument (and no **kwargs): it "
                            "cannot score completions. Give it TRL's signature, e.g. "
                            "def reward(completions, **kwargs) -> list[float]")

    def __call__(self, arguments: dict[str, Any], count: int) -> np.ndarray:
        """Rewards of `count` completions (NaN where the function returned None)."""
        kwargs = arguments if self.takes_all else {k: v for k, v in arguments.items() if k in self.accepted}
        values = self.func(**kwargs)
        if self.is_async or inspect.isawaitable(values):
            values = _run_coroutine(values)
        return self.check_output(values, count)

    def check_output(self, values: Any, count: int) -> np.ndarray:
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
            raise EssaError(f"reward function {self.name} returned {type(values).__name__}, not a list of "
                            f"{count} floats (one per completion, None where it does not apply)")
        values = list(values.tolist() if hasattr(values, "tolist") else values)
        if len(values) != count:
            raise EssaError(f"reward function {self.name} returned {len(values)} values for {count} completions; "
                            "it must return exactly one per completion")
        out = np.empty(count, dtype=np.float64)
        for i, value in enumerate(values):
            if value is None:
                out[i] = math.nan
            elif isinstance(value, (int, float, np.integer, np.floating)) or _is_scalar_tensor(value):
                out[i] = float(value)
            else:
                raise EssaError(f"reward function {self.name} returned {value!r} at position {i}: rewards must "
                                "be numbers (or None)")
        return out


class RewardModelFunction(RewardFunction):
    """A sequence-classification reward model (local dir or hub id) as a reward function."""

    def __init__(self, model: str) -> None:
        from essa.tasks.reward_model import RewardScorer

        self.name = model
        self.scorer = RewardScorer(model)
        self.is_async = self.takes_all = False
        self.accepted = set(TRL_ARGUMENTS)

    def load(self) -> None:
        """Load the reward model now (a bad path fails before any run starts)."""
        _ = self.scorer.tokenizer

    def __call__(self, arguments: dict[str, Any], count: int) -> np.ndarray:
        prompts, completions = arguments["prompts"], arguments["completions"]
        if prompts and isinstance(prompts[0], list):
            values = self.scorer.score_conversations([list(p) + list(c) for p, c in zip(prompts, completions)])
        else:
            values = self.scorer.score_batch(list(prompts), list(completions))
        return self.check_output(values, count)


def reward_functions(funcs: Any, columns: Sequence[str]) -> list[RewardFunction]:
    """Callables (TRL's signature) and reward-model names as checked `RewardFunction`s."""
    if funcs is None or (isinstance(funcs, (list, tuple)) and not funcs):
        raise EssaError("no reward function given: pass reward_funcs=[...] (callables with TRL's signature, "
                        "or a reward model id)")
    if callable(funcs) or isinstance(funcs, str):
        funcs = [funcs]
    out: list[RewardFunction] = []
    for func in funcs:
        if isinstance(func, RewardFunction):
            out.append(func)
        elif isinstance(func, str):
            out.append(RewardModelFunction(func))
        elif callable(func) and not _is_torch_module(func):
            out.append(RewardFunction(func, columns))
        else:
            raise EssaError(f"reward function {func!r} is neither a callable nor a reward model id (a "
                            "sequence-classification model directory or hub id)")
    return out


def check_weights(weights: Sequence[float] | None, funcs: list[RewardFunction]) -> np.ndarray:
    """The reward weights as an array, one finite number per function (default 1 each)."""
    if weights is None:
        return np.ones(len(funcs))
    weights = list(weights)
    if len(weights) != len(funcs):
        raise EssaError(f"reward_weights has {len(weights)} weights for {len(funcs)} reward functions")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise EssaError(f"reward_weights must be finite numbers (got {w!r})")
    return np.asarray(weights, dtype=np.float64)


def load_reward_spec(spec: str) -> Callable[..., Any] | str:
    """`path/to/file.py:function` or `module:function` as the function; a spec without a colon is
    a reward-model name and comes back as it is."""
    if ":" not in spec:
        return spec
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise EssaError(f"reward function file not found: {path}")
            module_spec = importlib.util.spec_from_file_location(f"essa_user_rewards_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except EssaError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code: report, don't dump a traceback
        raise EssaError(f"could not load reward function {spec}: {type(exc).__name__}: {exc}") from exc
    func = getattr(module, attr, None)
    if func is None or not callable(func):
        raise EssaError(f"reward function {spec}: {target} has no function '{attr}'")
    return func


def reward_name(func: Any) -> str:
    """How a reward function is named in messages and records: `module:qualname` where importable."""
    if isinstance(func, str):
        return func
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or type(func).__name__
    module = getattr(func, "__module__", None)
    if module and module != "__main__" and not module.startswith("essa_user_rewards_") and "<" not in name:
        return f"{module}:{name}"
    return name


# -- rows ----------------------------------------------------------------------------------------
def dataset_rows(data: Any, what: str) -> list[dict[str, Any]]:
    """A `datasets.Dataset` or a list of dicts as a list of dicts with a usable "prompt"."""
    if data is None:
        return []
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None and isinstance(data, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise EssaError(f"{what} is an IterableDataset; ESSA draws seeded mini-batches from a dataset it can "
                        "index: pass a datasets.Dataset (e.g. Dataset.from_list(list(stream.take(N))))")
    if datasets is not None and isinstance(data, datasets.DatasetDict):
        raise EssaError(f"{what} is a DatasetDict ({', '.join(data)}): pass one split, e.g. dataset['train']")
    if datasets is not None and isinstance(data, datasets.Dataset):
        if "prompt" not in data.column_names:
            raise EssaError(f"{what} has no 'prompt' column (columns: {', '.join(data.column_names)})")
        rows = data.to_list()
    elif isinstance(data, (list, tuple)):
        rows = list(data)
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise EssaError(f"{what}: row {i} is a {type(row).__name__}, not a dict of columns")
    else:
        raise EssaError(f"{what} must be a datasets.Dataset or a list of dicts (got {type(data).__name__})")
    if not rows:
        raise EssaError(f"{what} is empty")
    for i, row in enumerate(rows):
        check_prompt(row.get("prompt"), f"{what}: row {i}")
    return rows


def check_prompt(prompt: Any, where: str) -> None:
    """A prompt is a non-empty string or a non-empty list of {"role", "content"} messages."""
    if isinstance(prompt, str):
        return
    if prompt is None:
        raise EssaError(f"{where} has no 'prompt' (a text, or a list of chat messages)")
    if isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return
    raise EssaError(f"{where}: 'prompt' must be a text or a list of chat messages "
                    f"({{'role': ..., 'content': ...}}), got {prompt!r:.80}")


def columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """The columns reward functions receive: every key of the rows but prompt, completion, completion_ids."""
    names: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in NOT_PASSED:
                names[key] = None
    return list(names)


def _example(row: dict[str, Any]) -> Example:
    prompt = row["prompt"]
    conversational = not isinstance(prompt, str)
    prompt = [dict(m) for m in prompt] if conversational else prompt
    shown = "\n".join(f"{m['role']}: {m['content']}" for m in prompt) if conversational else prompt
    columns = {k: v for k, v in row.items() if k not in NOT_PASSED}
    return Example(prompt=shown, answer=columns, target=_completion_text(row.get("completion")),
                   meta={"prompt": prompt, "conversational": conversational})


def _completion_text(completion: Any) -> str | None:
    if completion is None or isinstance(completion, str):
        return completion or None
    if isinstance(completion, (list, tuple)):  # conversational: the assistant message(s)
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict)) or None
    return str(completion)


# -- the task ------------------------------------------------------------------------------------
class DatasetTask(Task):
    """Prompts from dataset rows; reward = the weighted sum of TRL-style reward functions."""

    name = "dataset"

    def __init__(self, splits: dict[str, list[dict[str, Any]]], reward_funcs: Any,
                 reward_weights: Sequence[float] | None = None, validation_size: int = 64, seed: int = 0,
                 name: str = "dataset") -> None:
        self.name = name
        train = list(splits.get("train") or [])
        validation = list(splits.get("validation") or [])
        if train and not validation and validation_size > 0:
            train, validation = _hold_out(train, validation_size, seed)
        sft = list(splits.get("sft") or [r for r in train if _completion_text(r.get("completion"))])
        rows = {"sft": sft, "train": train, "validation": validation, "test": list(splits.get("test") or [])}
        self.columns = columns_of([r for split in rows.values() for r in split])
        self.funcs = reward_functions(reward_funcs, self.columns)
        self.weights = check_weights(reward_weights, self.funcs)
        self._splits = {split: [_example(r) for r in rows[split]] for split in SPLITS}
        self._tokenizer: Any = None  # known once prompts are formatted; for completion_ids

    @classmethod
    def from_options(cls, cfg: TaskConfig) -> DatasetTask:
        """The task of `task.name: dataset`, from `task.options` (`DatasetOptions`)."""
        options = build_section(DatasetOptions, dict(cfg.options), prefix="task.options.")
        if options.source == "python":
            raise EssaError("this config was written by essa.ESSATrainer: its datasets and reward functions were "
                            "Python objects that a config file cannot rebuild. Run the script again, or give "
                            "task.options.train (a file or datasets id) and task.options.reward_funcs "
                            "(file.py:function or module:function)")
        if not options.reward_funcs:
            raise EssaError("task 'dataset' needs task.options.reward_funcs (file.py:function, module:function, "
                            "or a reward model)")
        splits = {}
        for split in SPLITS:
            source = getattr(options, split)
            if source:
                splits[split] = load_records(source, split=getattr(options, f"{split}_split"),
                                             required=["prompt"], config=options.config)
                for i, row in enumerate(splits[split]):
                    check_prompt(row.get("prompt"), f"{source}: row {i + 1}")
        if not splits:
            raise EssaError("task 'dataset' needs a data source: task.options.train, validation, test or sft "
                            "(a .jsonl/.json/.parquet file or a datasets id)")
        funcs = [load_reward_spec(spec) for spec in options.reward_funcs]
        task = cls(splits, funcs, options.reward_weights, validation_size=cfg.validation_size, seed=cfg.seed)
        task.load_reward_models()
        return task

    # -- Task ------------------------------------------------------------------------------------
    def split(self, name: str) -> list[Example]:
        if name not in self._splits:
            raise EssaError(f"unknown split '{name}' (choose from {', '.join(SPLITS)})")
        return list(self._splits[name])

    def messages(self, example: Example) -> list[dict[str, Any]]:
        if example.meta["conversational"]:
            return [dict(m) for m in example.meta["prompt"]]
        return [{"role": "user", "content": example.prompt}]

    def prompt_text(self, tokenizer: Any, example: Example) -> str:
        """Plain prompts as they are (as TRL feeds them); chat prompts through the chat template."""
        self._tokenizer = tokenizer
        if not example.meta["conversational"]:
            return example.prompt
        return super().prompt_text(tokenizer, example)

    def sft_target(self, example: Example) -> str:
        if example.target is None:
            raise EssaError(f"dataset row {example.prompt[:60]!r} has no 'completion' to fine-tune on")
        return example.target

    def reward(self, completion: str, example: Example) -> float:
        return self.reward_batch([completion], [example])[0]

    def reward_batch(self, completions: list[str], examples: list[Example]) -> list[float]:
        """The weighted sum of the reward functions; a completion none of them applies to scores 0."""
        arguments = self.arguments(completions, examples)
        values = np.stack([func(arguments, len(completions)) for func in self.funcs])
        weighted = values * self.weights[:, None]
        return [float(v) for v in np.nansum(weighted, axis=0)]

    # -- helpers ---------------------------------------------------------------------------------
    def arguments(self, completions: list[str], examples: list[Example]) -> dict[str, Any]:
        """The keyword arguments TRL passes a reward function for these completions."""
        chat = bool(examples) and examples[0].meta["conversational"]
        arguments: dict[str, Any] = {
            "prompts": [ex.meta["prompt"] for ex in examples],
            "completions": [[{"role": "assistant", "content": c}] for c in completions] if chat else list(completions),
            "completion_ids": None,
            "trainer_state": None,
            "log_extra": _ignore,
            "log_metric": _ignore,
        }
        if self._tokenizer is not None:
            arguments["completion_ids"] = [self._tokenizer(c, add_special_tokens=False)["input_ids"]
                                           for c in completions]
        for column in self.columns:
            arguments[column] = [ex.answer.get(column) for ex in examples]
        return arguments

    def check_rewards(self) -> None:
        """A trial call of every reward function on a few rows: EssaError for a wrong signature,
        a wrong number of values, non-numbers, or an exception, before anything is written."""
        examples = next((self._splits[s][:PROBE_ROWS] for s in ("train", "validation", "test", "sft")
                         if self._splits[s]), [])
        if not examples:
            return
        completions = [ex.target or "" for ex in examples]
        arguments = self.arguments(completions, examples)
        for func in self.funcs:
            if isinstance(func, RewardModelFunction):
                continue
            try:
                func(arguments, len(examples))
            except EssaError:
                raise
            except Exception as exc:  # noqa: BLE001 - user code: one clear line
                raise EssaError(f"reward function {func.name} failed on a trial call with {len(examples)} "
                                f"completions: {type(exc).__name__}: {first_line(exc)}") from exc

    def load_reward_models(self) -> None:
        for func in self.funcs:
            if isinstance(func, RewardModelFunction):
                func.load()

    def reward_specs(self) -> list[str]:
        return [func.name for func in self.funcs]


def dataset_task(cfg: TaskConfig) -> DatasetTask:
    """Registry factory of `task.name: dataset`."""
    task = DatasetTask.from_options(cfg)
    task.check_rewards()
    return task


def _hold_out(train: list[dict[str, Any]], size: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`size` rows of train (seeded choice) as validation; the rest, in their order, stay train."""
    if len(train) <= size:
        raise EssaError(f"the train data has {len(train)} prompts, too few to hold out validation_size={size} "
                        "for validation and keep some to train on: give a validation set (eval_dataset), or "
                        "lower validation_size")
    chosen = set(random.Random(f"dataset/{seed}").sample(range(len(train)), size))
    return ([r for i, r in enumerate(train) if i not in chosen], [r for i, r in enumerate(train) if i in chosen])


def _ignore(*args: Any, **kwargs: Any) -> None:
    """`log_extra` / `log_metric`: accepted as TRL passes them; essa logs the trainer's own record."""


def _run_coroutine(value: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(value)
    raise EssaError("an async reward function was called inside a running event loop; call essa from plain code")


def _is_scalar_tensor(value: Any) -> bool:
    return hasattr(value, "item") and getattr(value, "ndim", 1) == 0


def _is_torch_module(value: Any) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(value, torch.nn.Module)
