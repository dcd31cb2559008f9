"""`ESSAConfig`: essa's settings with the shape of TRL's GRPOConfig, for `essa.ESSATrainer`.

`ESSAConfig` has no settings of its own: each field is a setting of a `Config` section (or of the
dataset task's options), with that setting's type, default, help text and check. Every setting
`essa train` reads is a field, derived from the config sections (`FIELDS` maps field names to
config keys; `ALIASES` holds TRL's names where a setting means the same there); the model and the
data are the trainer's arguments and `essa compare`'s settings are not fields (`NOT_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, ClassVar

from essa.config import Config, config_from_mapping, settings
from essa.errors import EssaError
from essa.tasks.dataset import DatasetOptions

# ESSAConfig's names for settings whose field name is not derived from the key (TRL's names where
# a setting means the same there, and the data options the trainer reads). Every other setting
# `essa train` reads is a field too, named by `_derived_name`.
ALIASES: dict[str, str] = {
    "max_completion_length": "decoding.max_new_tokens",
    "temperature": "decoding.temperature",
    "top_p": "decoding.top_p",
    "decoding_batch_size": "decoding.batch_size",
    "reward_weights": "task.options.reward_weights",
    "validation_size": "task.validation_size",
    "data_seed": "task.seed",
    "lora_r": "lora.rank",
    "lora_alpha": "lora.lora_alpha",
    "lora_target_modules": "lora.targets",
    "sft_learning_rate": "sft.lr",
    "dtype": "model.dtype",
    "quantize": "model.quantize",
    "threads": "model.threads",
    "backend": "backend.kind",
    "vllm_options": "backend.vllm_options",
    "report_to": "tracking.report_to",
    "project": "tracking.project",
    "run_name": "tracking.run_name",
    "logging_dir": "tracking.logging_dir",
    "tracking_offline": "tracking.offline",
    "log_completions": "tracking.log_completions",
}
# Settings that are not fields: ESSATrainer takes them from its arguments, or they belong to
# `essa compare`. `ESSAConfig.from_config` refuses a config that sets one (it would be dropped).
NOT_FIELDS: dict[str, str] = {
    "model.name": "the model is ESSATrainer's `model` argument",
    "task.": "the data and rewards are ESSATrainer's train_dataset / eval_dataset / reward_funcs",
    "compare.": "a setting of `essa compare`, which ESSATrainer does not run",
    "grpo.": "a setting of `essa compare`'s GRPO arm, which ESSATrainer does not run",
}


def _derived_name(key: str) -> str:
    """The field name of a config key: the search's own keys by name (popsize), the top-level
    ones as they are (output_dir), others prefixed by their section (sft_patience)."""
    section, _, leaf = key.rpartition(".")
    return leaf if section in ("", "essa") else key.replace(".", "_")


def _not_a_field(key: str) -> str | None:
    """Why `key` is not an ESSAConfig field, or None when it is one."""
    if key in ALIASES.values():
        return None
    return next((why for prefix, why in NOT_FIELDS.items() if key == prefix or key.startswith(prefix)), None)


def _field_map() -> dict[str, str]:
    """ESSAConfig field -> the config key it sets (YAML `section: {key: ...}`, CLI `section.key=...`)."""
    from essa.config import settings

    by_key = {key: name for name, key in ALIASES.items()}
    # Top-level settings (output_dir, adapter) first, then the sections in declaration order.
    keys = [s.key for s in sorted(settings(), key=lambda s: "." in s.key)]
    keys.append("task.options.reward_weights")
    return {by_key.get(key, _derived_name(key)): key for key in keys if _not_a_field(key) is None}


FIELDS: dict[str, str] = _field_map()

# GRPOConfig settings without an ESSA counterpart, and what to use instead.
_GRPO_ONLY = {
    "learning_rate": "ESSA takes no gradient steps; the search's step size is sigma0",
    "num_generations": "GRPO's group size; ESSA's candidates per generation are popsize",
    "max_steps": "ESSA's steps are generations",
    "num_train_epochs": "set generations (or time_budget_s)",
    "per_device_train_batch_size": "ESSA's prompts per step are prompts_per_generation",
    "gradient_accumulation_steps": "ESSA computes no gradients",
    "beta": "ESSA has no KL term",
    "max_prompt_length": "prompts are used whole",
    "use_vllm": "set backend='vllm'",
    "logging_steps": "every generation is logged",
    "bf16": "set dtype='bfloat16'",
    "model_init_kwargs": "set dtype / quantize",
    "push_to_hub": "call trainer.push_to_hub(repo_id) after train()",
}


class _ESSAConfigMethods:
    """Methods of ESSAConfig; its fields are generated from `FIELDS` below."""

    FIELDS: ClassVar[dict[str, str]] = FIELDS

    def __post_init__(self) -> None:
        self.to_config()  # every section checks its own fields

    def to_config(self, base: Config | None = None) -> Config:
        """These settings as a checked `Config` (over `base`); errors name the ESSAConfig field."""
        mapping: dict[str, Any] = {}
        for name, key in FIELDS.items():
            node = mapping
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = getattr(self, name)
        try:
            return config_from_mapping(mapping, base=base)
        except EssaError as exc:
            raise EssaError(_field_names(str(exc))) from exc

    @classmethod
    def from_config(cls, cfg: Config, arguments: bool = False) -> Any:
        """The ESSAConfig view of a `Config` (e.g. one loaded from a YAML file). A setting that is
        not a field but differs from its default is an error (it would be dropped silently);
        `arguments=True` lets the model and task through (an ESSATrainer run's own config, whose
        model and data came from the trainer's arguments)."""
        data = cfg.to_dict()
        values = {}
        for name, key in FIELDS.items():
            node: Any = data
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            values[name] = node
        _refuse_dropped_settings(cfg, arguments)
        return cls(**values)

    def changed(self) -> dict[str, Any]:
        """The fields that differ from their defaults."""
        default = type(self)()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


def _make_config_class() -> type:
    known = {s.key: s for s in settings()}
    known.update({s.key: s for s in settings(DatasetOptions, "task.options.")})
    fields = []
    doc = ["Settings of `ESSATrainer`, shaped like TRL's GRPOConfig. Every field is a setting of essa's",
           "config (its key in parentheses), with that setting's default, help and check.", "", "Fields:"]
    for name, key in FIELDS.items():
        s = known[key]
        metadata = {"help": s.help, "config_key": key}
        if isinstance(s.default, (list, dict)):
            spec = dataclasses.field(default_factory=functools.partial(_copy, s.default), metadata=metadata)
        else:
            spec = dataclasses.field(default=s.default, metadata=metadata)
        fields.append((name, s.type, spec))
        doc.append(f"    {name} ({key}, default {s.default!r}): {s.help}")
    cls = dataclasses.make_dataclass("ESSAConfig", fields, bases=(_ESSAConfigMethods,),
                                     namespace={"__doc__": "\n".join(doc), "__module__": __name__})
    generated = cls.__init__

    @functools.wraps(generated)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in FIELDS]
        if unknown:
            hints = "; ".join(f"{k}: {_GRPO_ONLY[k]}" for k in unknown if k in _GRPO_ONLY)
            raise EssaError(f"ESSAConfig has no setting {', '.join(map(repr, unknown))}"
                            + (f" ({hints})" if hints else "") + f". Its settings: {', '.join(FIELDS)}")
        generated(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def _refuse_dropped_settings(cfg: Config, arguments: bool) -> None:
    from essa.config import dotted

    default = dotted(Config().to_dict())
    dropped = []
    for key, value in dotted(cfg.to_dict()).items():
        why = _not_a_field(key) if key in default or key.startswith("task.options.") else None
        if why is None or value == default.get(key) or (arguments and key.startswith(("model.", "task."))):
            continue
        dropped.append(f"{key}={value!r} ({why})")
    if dropped:
        raise EssaError("ESSAConfig cannot take " + "; ".join(dropped))


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


def _field_names(message: str) -> str:
    """A config error with each config key replaced by the ESSAConfig field that sets it."""
    for name, key in sorted(FIELDS.items(), key=lambda item: -len(item[1])):
        message = re.sub(rf"(?<![\w.]){re.escape(key)}(?![\w.])", name, message)
    return message


ESSAConfig = _make_config_class()


__all__ = ["ALIASES", "ESSAConfig", "FIELDS", "NOT_FIELDS"]
