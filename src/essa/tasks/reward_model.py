"""Reward-model fitness: a Hugging Face sequence-classification model scores each completion.

The paper's HelpSteer2 experiment scores completions with a reward model (ArmoRM-Llama3-8B).
Any `AutoModelForSequenceClassification` works here: the (prompt, completion) pair is rendered
with the reward model's own chat template when it has one (user turn + assistant turn), else as
"prompt\\n\\ncompletion", and the score is the logit at `reward_label` (default 0; a model output
with a `score` field, as custom reward heads such as ArmoRM's have, is used instead).

Options (`task.options`):
- `reward_model` (required): a local model directory, or a hub id where the hub is reachable.
- `reward_device` ("cpu"), `reward_dtype` ("float32"), `reward_batch_size` (8),
  `reward_max_length` (2048 tokens; longer inputs are cut at the end),
  `reward_label` (0), `reward_trust_remote_code` (false; custom heads such as ArmoRM need true).
- `prompts_file`: JSONL/JSON/Parquet with a `prompt` field and an optional `response` (the SFT
  target), or a `datasets` id (`prompts_split`, default "train"). Task `helpsteer2` defaults to
  `nvidia/HelpSteer2`, which needs the hub; offline, give a local file. Rows sharing a prompt
  are merged; where rows carry a numeric `helpfulness` (HelpSteer2), the most helpful response
  is the SFT target.
- `eval_prompts_file` / `eval_prompts_split`: optional separate source for validation and test.
- Normalisation (off by default): reward = (raw - `reward_shift`) / `reward_scale`, passed
  through a sigmoid when `reward_sigmoid` is true (rewards then lie in (0, 1)). All three are
  monotone, so they leave CMA-ES, which only ranks candidates, unchanged; they matter for reports
  and for methods that use reward magnitudes.
- `system_prompt`: system message for the policy (default none).

Splits: unique prompts are shuffled by the task seed; validation and test are taken first,
then sft (prompts that have a response), then train, so no prompt is in two splits. A source
too small for the requested sizes gives shorter splits, with a warning.
"""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING, Any

from essa.errors import EssaError, first_line
from essa.tasks.base import SPLITS, Example, Task
from essa.tasks.data import load_records, reject_unknown_options
from essa.tasks.splits import pick_split, split_sizes

if TYPE_CHECKING:
    from essa.config import TaskConfig

log = logging.getLogger(__name__)

_KNOWN_OPTIONS = {
    "reward_model", "reward_device", "reward_dtype", "reward_batch_size", "reward_max_length",
    "reward_label", "reward_trust_remote_code", "prompts_file", "prompts_split",
    "eval_prompts_file", "eval_prompts_split", "reward_shift", "reward_scale", "reward_sigmoid",
    "system_prompt",
}
_DTYPES = ("float32", "bfloat16", "float16")


class RewardScorer:
    """Batched scores of (prompt, completion) pairs by a sequence-classification reward model.

    The model loads on first use, so building a task (e.g. to list its prompts) stays cheap.
    """

    def __init__(self, model: str, device: str = "cpu", dtype: str = "float32", label: int = 0,
                 batch_size: int = 8, max_length: int = 2048,
                 trust_remote_code: bool = False) -> None:
        if dtype not in _DTYPES:
            raise EssaError(f"task.options.reward_dtype must be one of {', '.join(_DTYPES)} "
                            f"(got {dtype!r})")
        for name, value in (("reward_batch_size", batch_size), ("reward_max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EssaError(f"task.options.{name} must be a positive integer (got {value!r})")
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise EssaError("task.options.reward_label must be a non-negative integer "
                            f"(got {label!r})")
        self.model_name, self.device, self.dtype = model, device, dtype
        self.label, self.batch_size, self.max_length = label, batch_size, max_length
        self.trust_remote_code = trust_remote_code
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                self.model_name, trust_remote_code=self.trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(
                self.model_name, dtype=getattr(torch, self.dtype),
                trust_remote_code=self.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - missing dir, offline hub, bad config: one line
            raise EssaError(f"could not load reward model '{self.model_name}': {first_line(exc)}") from exc
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise EssaError(f"reward model '{self.model_name}': its tokenizer has neither a "
                                "pad nor an eos token to pad batches with")
            tokenizer.pad_token = tokenizer.eos_token
        # Right padding keeps every real token at the position it has unbatched, so a batch
        # scores exactly like single pairs; the model pools at the last non-pad token.
        tokenizer.padding_side = "right"
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        labels = getattr(model.config, "num_labels", 1)
        if self.label >= labels:
            raise EssaError(f"task.options.reward_label is {self.label} but reward model "
                            f"'{self.model_name}' has {labels} output label(s)")
        try:
            model.to(self.device)
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise EssaError(f"cannot place the reward model on device '{self.device}': "
                            f"{exc}") from exc
        self._model, self._tokenizer = model.eval(), tokenizer

    @property
    def tokenizer(self) -> Any:
        self._load()
        return self._tokenizer

    def format_pair(self, prompt: str, completion: str) -> str:
        """The text the reward model reads for one pair."""
        return format_pair(self.tokenizer, prompt, completion)

    def score_batch(self, prompts: list[str], completions: list[str]) -> list[float]:
        """Raw reward-model scores, one per (prompt, completion) pair, in input order."""
        if len(prompts) != len(completions):
            raise EssaError(f"score_batch got {len(prompts)} prompts but "
                            f"{len(completions)} completions")
        self._load()
        return self._score_texts([self.format_pair(p, c) for p, c in zip(prompts, completions)])

    def score_conversations(self, conversations: list[list[dict[str, Any]]]) -> list[float]:
        """Raw scores of whole chats (a prompt's messages then the assistant's completion), in
        input order, each rendered as `format_conversation` does."""
        self._load()
        return self._score_texts([format_conversation(self._tokenizer, c) for c in conversations])

    def _score_texts(self, texts: list[str]) -> list[float]:
        import torch

        templated = bool(getattr(self._tokenizer, "chat_template", None))
        # Similar lengths together waste less compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores = [0.0] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                batch = self._tokenizer(
                    [texts[i] for i in chunk], return_tensors="pt", padding=True,
                    truncation=True, max_length=self.max_length,
                    add_special_tokens=not templated,  # a chat template adds its own specials
                ).to(self.device)
                for i, value in zip(chunk, self._head(self._model(**batch))):
                    scores[i] = value
        return scores

    def _head(self, output: Any) -> list[float]:
        score = getattr(output, "score", None)
        values = score if score is not None else output.logits
        if values.dim() == 2:
            values = values[:, self.label]
        return [float(v) for v in values.float().cpu()]


def format_conversation(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """A chat through the tokenizer's chat template, else as "role: content" lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def format_pair(tokenizer: Any, prompt: str, completion: str) -> str:
    """User/assistant turns through the tokenizer's chat template, else "prompt\\n\\ncompletion"."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{prompt}\n\n{completion}"


class RewardModelTask(Task):
    """Prompts from a file or dataset; reward = a reward model's score of the completion."""

    name = "reward_model"
    default_prompts: str | None = None

    def __init__(self, cfg: TaskConfig) -> None:
        options = dict(cfg.options)
        reject_unknown_options(self.name, options, _KNOWN_OPTIONS)
        if not options.get("reward_model"):
            raise EssaError(f"task '{self.name}' needs task.options.reward_model "
                            "(a local reward-model directory)")
        self.system_prompt = options.get("system_prompt") or None
        self.scorer = RewardScorer(
            str(options["reward_model"]), device=str(options.get("reward_device", "cpu")),
            dtype=str(options.get("reward_dtype", "float32")),
            label=options.get("reward_label", 0),
            batch_size=options.get("reward_batch_size", 8),
            max_length=options.get("reward_max_length", 2048),
            trust_remote_code=bool(options.get("reward_trust_remote_code", False)),
        )
        self.shift = _number(options, "reward_shift", 0.0)
        self.scale = _number(options, "reward_scale", 1.0)
        if self.scale == 0:
            raise EssaError("task.options.reward_scale must not be 0")
        self.sigmoid = bool(options.get("reward_sigmoid", False))
        self._splits = self._build_splits(cfg, options)

    def _build_splits(self, cfg: TaskConfig, options: dict[str, Any]) -> dict[str, list[Example]]:
        source = options.get("prompts_file") or self.default_prompts
        if not source:
            raise EssaError(f"task '{self.name}' needs task.options.prompts_file "
                            "(a JSONL file with a 'prompt' field)")
        sizes = split_sizes(cfg)
        rng = random.Random(f"{self.name}/{cfg.seed}")
        pool = _shuffled(load_prompts(str(source), options.get("prompts_split")), rng)
        eval_source = options.get("eval_prompts_file")
        held = pool
        if eval_source:
            held = _shuffled(load_prompts(str(eval_source), options.get("eval_prompts_split",
                                                                            "validation")), rng)
        out: dict[str, list[Example]] = {"validation": [], "test": []}
        taken: set[str] = set()
        for split in ("validation", "test"):
            out[split] = _take(held, sizes[split], taken)
        out["sft"] = _take(pool, sizes["sft"], taken, need_target=True)
        out["train"] = _take(pool, sizes["train"], taken)
        for split in SPLITS:
            if len(out[split]) < sizes[split]:
                log.warning("task '%s': split '%s' has %d prompts (asked for %d): the prompt "
                            "source is too small", self.name, split, len(out[split]), sizes[split])
        return out

    def split(self, name: str) -> list[Example]:
        return pick_split(self._splits, name)

    def normalize(self, raw: float) -> float:
        value = (raw - self.shift) / self.scale
        return 1.0 / (1.0 + math.exp(-value)) if self.sigmoid else value

    def reward(self, completion: str, example: Example) -> float:
        return self.reward_batch([completion], [example])[0]

    def reward_batch(self, completions: list[str], examples: list[Example]) -> list[float]:
        """Rewards of many completions in batched reward-model passes, in input order."""
        raw = self.scorer.score_batch([e.prompt for e in examples], list(completions))
        return [self.normalize(r) for r in raw]


class HelpSteer2Task(RewardModelTask):
    """The paper's HelpSteer2 setting: HelpSteer2 prompts scored by a reward model."""

    name = "helpsteer2"
    default_prompts = "nvidia/HelpSteer2"


def load_prompts(source: str, split: str | None = None) -> list[Example]:
    """Unique prompts of a file or dataset, each with its best response (if any) as target."""
    best: dict[str, tuple[float, str | None]] = {}
    for row in load_records(source, split=split, required=["prompt"]):
        prompt = str(row["prompt"])
        response = row.get("response")
        response = str(response) if response not in (None, "") else None
        rank = _helpfulness(row) if response is not None else -math.inf
        if prompt not in best or rank > best[prompt][0]:
            best[prompt] = (rank, response)
    return [Example(prompt=p, target=r, meta={"source": source}) for p, (_, r) in best.items()]


def _helpfulness(row: dict[str, Any]) -> float:
    value = row.get("helpfulness")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _shuffled(examples: list[Example], rng: random.Random) -> list[Example]:
    examples = list(examples)
    rng.shuffle(examples)
    return examples


def _take(pool: list[Example], size: int, taken: set[str],
          need_target: bool = False) -> list[Example]:
    out = []
    for example in pool:
        if len(out) >= size:
            break
        if example.prompt in taken or (need_target and example.target is None):
            continue
        taken.add(example.prompt)
        out.append(example)
    return out


def _number(options: dict[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EssaError(f"task.options.{key} must be a number (got {value!r})")
    return float(value)

