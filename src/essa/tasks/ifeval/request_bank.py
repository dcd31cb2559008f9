"""The everyday writing requests the IFEval-like generator draws from, packaged as `requests.json`.

Each entry is (request, title, canned answer). Answers are three short English sentences with no
commas or quotes, so every instruction transform of the generator can be applied to them.

- `TRAIN_REQUESTS`: the only requests sft/train prompts are built from.
- `HELDOUT_REQUESTS`: never used for sft/train; the offline validation/test prompts are built
  only from these. 50 requests: with 14, a few hundred prompts with one instruction exhausted the
  held-out space, so the test split held most of it and any further held-out prompts were its
  leftovers.
"""

from __future__ import annotations

import json
from importlib import resources

Request = tuple[str, str, str]  # (request, title, canned answer)


def _load() -> dict[str, tuple[Request, ...]]:
    text = resources.files(__package__).joinpath("requests.json").read_text(encoding="utf-8")
    return {bank: tuple((e["request"], e["title"], e["answer"]) for e in entries)
            for bank, entries in json.loads(text).items()}


_BANKS = _load()
TRAIN_REQUESTS: tuple[Request, ...] = _BANKS["train"]
HELDOUT_REQUESTS: tuple[Request, ...] = _BANKS["heldout"]
