"""`ESSATrainer` and `ESSAConfig`: ESSA with the shape of TRL's GRPOTrainer and GRPOConfig.

    trainer = ESSATrainer(model="HuggingFaceTB/SmolLM2-135M-Instruct", reward_funcs=[accuracy],
                          train_dataset=dataset, args=ESSAConfig(output_dir="essa-out", popsize=16),
                          peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    trainer.save_model("my-adapter")

It is a thin layer over what `essa train` runs: the dataset and reward functions become a
`essa.tasks.dataset.DatasetTask`, the settings a `Config`, and `train()` calls
`essa.commands.run_sft` (when a warm start is needed) and `run_train`, so the same settings and
seed give the same fitness history as the command line. Everything is checked when the trainer
is built (data, reward functions, settings, model, adapter), before anything is written.

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
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from essa.config import Config, TaskConfig, config_from_mapping, settings
from essa.console import say
from essa.errors import EssaError
from essa.tasks.dataset import DatasetOptions, DatasetTask, dataset_rows, reward_name

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
    keys = [s.key for s in settings() if "." not in s.key] + [s.key for s in settings() if "." in s.key]
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


class ESSATrainer:
    """ESSA with TRL's GRPOTrainer interface: `train()`, `evaluate()`, `save_model()`, `push_to_hub()`.

    Args:
        model: a hub id, a local model directory, a .gguf file or the bundled alias
            (smollm2-135m-instruct); a `transformers.PreTrainedModel`; or a `peft.PeftModel` whose LoRA
            adapter is the warm start (its LoRA layers are removed from the model and the adapter is
            searched).
        reward_funcs: one or a list of reward functions with TRL's signature (see
            `essa.tasks.dataset`), or sequence-classification reward model ids; combined with
            `args.reward_weights`.
        args: an `ESSAConfig`.
        train_dataset: a `datasets.Dataset` or a list of dicts with a "prompt" column (text or chat
            messages); an optional "completion" column is the SFT target; other columns reach the
            reward functions by name.
        eval_dataset: the validation prompts that choose the final adapter (default:
            `args.validation_size` prompts held out of `train_dataset`); `evaluate()` scores them.
        processing_class: the tokenizer (default: loaded with the model).
        peft_config: a `peft.LoraConfig`: with a plain model, the LoRA SFT warm start trains this
            adapter first (default: `args.lora_*`), on `sft_dataset` or the "completion" column.
        sft_dataset: rows with "prompt" and "completion" for the SFT warm start.
        progress: show progress bars.
    """

    def __init__(self, model: Any, reward_funcs: Any, args: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, peft_config: Any = None,
                 sft_dataset: Any = None, progress: bool = True) -> None:
        from essa.backends import backend_class
        from essa.tracking import check_trackers

        args = ESSAConfig() if args is None else args
        if not isinstance(args, ESSAConfig):
            raise EssaError(f"args must be an essa.ESSAConfig (got {type(args).__name__}); a GRPOConfig's settings "
                            "do not carry over one to one: see ESSAConfig's fields")
        self.args, self.progress = args, progress
        cfg = args.to_config()
        if cfg.backend.kind == "ray":
            raise EssaError("backend='ray' needs a task its workers can rebuild from the config; ESSATrainer's "
                            "datasets and reward functions live in this process. Use `essa train` with "
                            "task.name=dataset (data files and file.py:function reward specs) on Ray")
        check_trackers(cfg)
        backend_class(cfg.backend.kind).check(cfg)

        # The data and the reward functions (a trial call on two rows).
        if train_dataset is None:
            raise EssaError("train_dataset is required: a datasets.Dataset or a list of dicts with a 'prompt' column")
        splits = {"train": dataset_rows(train_dataset, "train_dataset"),
                  "validation": dataset_rows(eval_dataset, "eval_dataset"),
                  "sft": dataset_rows(sft_dataset, "sft_dataset") or None}
        self.task = DatasetTask(splits, reward_funcs, cfg.task.options.get("reward_weights"),
                                validation_size=cfg.task.validation_size, seed=cfg.task.seed)
        self.task.load_reward_models()
        self.task.check_rewards()
        self.task.checked_split("train")
        self.task.checked_split("validation")

        # The model and where the search starts: a PeftModel's adapter, args.adapter, or an SFT warm start.
        peft_model = _peft_model(model)
        _refuse_two_starts(peft_model is not None, peft_config is not None, cfg.adapter is not None)
        lora = _lora_settings(peft_config) if peft_config is not None else None
        self._sft_needed = peft_model is None and cfg.adapter is None
        if self._sft_needed and not self.task.split("sft"):
            raise EssaError("ESSA starts from a LoRA adapter: pass a PeftModel, args.adapter=DIR, or data for "
                            "the SFT warm start (a 'completion' column in train_dataset, or sft_dataset)")
        self._start: tempfile.TemporaryDirectory | None = None
        if peft_model is not None:
            self._start = tempfile.TemporaryDirectory(prefix="essa-start-")
            start_adapter = _save_lora_adapter(peft_model, Path(self._start.name), cfg.essa.alpha)
            tokenizer = _tokenizer(processing_class, peft_model.get_base_model())
            # Every check passed: take the LoRA layers out; the search runs on the base model.
            self.model, self.processing_class = peft_model.unload(), tokenizer
        else:
            self.model, self.processing_class = _load(model, cfg, processing_class)
            start_adapter = cfg.adapter
        cfg.model.name = str(model) if isinstance(model, (str, Path)) else _model_name(self.model)
        cfg.model.dtype = _dtype_name(self.model, cfg.model.dtype)
        if lora is not None:
            cfg.lora = lora(self.model)

        from essa.sft import check_targets

        if self._sft_needed:
            check_targets(self.model, cfg.lora.targets)
        elif cfg.adapter is not None:
            from essa.commands import resolve_adapter_dir
            from essa.svd_space import SvdLoraSpace

            SvdLoraSpace.from_adapter(resolve_adapter_dir(cfg.adapter), cfg.essa.alpha, model=self.model)
        self.start_adapter = start_adapter
        cfg.task = TaskConfig(name="dataset", seed=cfg.task.seed, validation_size=cfg.task.validation_size,
                              sft_size=len(self.task.split("sft")), train_size=len(self.task.split("train")),
                              test_size=0, options={"source": "python", "reward_funcs": self.task.reward_specs(),
                                                    "reward_weights": cfg.task.options.get("reward_weights")})
        self.config = cfg
        self.adapter_dir: Path | None = None  # the trained adapter, after train()
        self._evaluation: dict[str, Any] = {}

    # -- TRL's methods ---------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: bool | None = None) -> dict[str, Any]:
        """SFT warm start (if needed), then the ESSA search; returns the run's summary.
        `resume_from_checkpoint=True` continues an interrupted run in args.output_dir."""
        from essa.commands import run_sft, run_train
        from essa.trainer import refuse_to_overwrite

        resume = bool(resume_from_checkpoint)
        out = Path(self.config.output_dir)
        refuse_to_overwrite(out, resume)
        cfg = self.config
        loaded = (self.model, self.processing_class)
        if self._sft_needed:
            adapter = out / "sft" / "adapter"
            if not (resume and (adapter / "adapter_config.json").is_file()):
                say(f"LoRA SFT warm start (rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}) on "
                    f"{len(self.task.split('sft'))} examples")
                adapter = run_sft(cfg.with_changes(output_dir=str(out / "sft")), progress=self.progress,
                                  model_and_tokenizer=loaded, task=self.task)
            cfg = cfg.with_changes(adapter=str(adapter))
        elif self._start is not None:
            adapter = out / "start_adapter"
            if not (adapter / "adapter_config.json").is_file():
                from essa.io import atomic_directory

                with atomic_directory(adapter) as tmp:
                    for item in Path(self.start_adapter).iterdir():
                        shutil.copy2(item, tmp / item.name)
            cfg = cfg.with_changes(adapter=str(adapter))
        self.start_adapter = cfg.adapter
        summary = run_train(cfg, resume=resume, progress=self.progress, model_and_tokenizer=loaded, task=self.task)
        self.adapter_dir = out / "adapter"
        return summary

    def evaluate(self, eval_dataset: Any = None, metric_key_prefix: str = "eval") -> dict[str, Any]:
        """Accuracy (reward >= 1) and mean reward of the trained adapter (before `train()`: the start
        adapter, or the base model while the SFT warm start has not run) on `eval_dataset`
        (default: the validation prompts), decoded as in training."""
        from essa.commands import run_eval

        if eval_dataset is None:
            task, split = self.task, "validation"
        else:
            task = DatasetTask({"test": dataset_rows(eval_dataset, "eval_dataset")}, self.task.funcs,
                               self.task.weights)
            task.check_rewards()
            split = "test"
        adapter = self.adapter_dir or self.start_adapter
        cfg = self.config.with_changes(adapter=str(adapter) if adapter is not None else None)
        metrics = run_eval(cfg, split=split, use_adapter=adapter is not None,
                           model_and_tokenizer=(self.model, self.processing_class), task=task)
        numbers = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # What the model card shows, with where the numbers come from.
        self._evaluation = {"eval_split": "validation" if eval_dataset is None else "eval_dataset", **numbers}
        return numbers

    def save_model(self, output_dir: str | None = None) -> Path:
        """The trained adapter, with its model card, in `output_dir` (default: args.output_dir/adapter)."""
        from essa.commands import run_export

        run_dir = self._trained()
        default = run_dir / "adapter"
        if output_dir is None or Path(output_dir).resolve() in (run_dir.resolve(), default.resolve()):
            if self._evaluation:
                from essa.model_card import read_run, write_card

                write_card(default, read_run(run_dir), evaluation=self._evaluation)
            return default
        return run_export(run_dir, output_dir, evaluation=self._evaluation or None)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload the trained adapter with its model card to the hub repo `repo_id`; returns its URL."""
        from essa.commands import run_export
        from essa.model_card import push_to_hub

        from essa.model_card import check_repo_id, read_run, write_card

        run_dir = self._trained()
        check_repo_id(repo_id)
        with tempfile.TemporaryDirectory(prefix="essa-push-") as tmp:
            out = run_export(run_dir, Path(tmp) / "adapter")
            write_card(out, read_run(run_dir), repo_id=repo_id, evaluation=self._evaluation or None)
            return push_to_hub(out, repo_id, private=private, token=token)

    def _trained(self) -> Path:
        if self.adapter_dir is None:
            raise EssaError("nothing trained yet: call trainer.train() first")
        return Path(self.config.output_dir)


# -- model and adapter helpers ---------------------------------------------------------------------
def _peft_model(model: Any) -> Any:
    try:
        import peft
    except ImportError:
        return None
    return model if isinstance(model, peft.PeftModel) else None


def _save_lora_adapter(peft_model: Any, where: Path, alpha: float) -> Path:
    """The PeftModel's active adapter saved in `where`, after checking it is a plain LoRA adapter."""
    import peft

    from essa.svd_space import SvdLoraSpace

    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    if not isinstance(config, peft.LoraConfig):
        raise EssaError(f"the PeftModel's adapter '{name}' is a {type(config).__name__} "
                        f"(peft_type {getattr(config, 'peft_type', '?')}); ESSA searches the singular values of "
                        "a LoRA adapter: pass a PeftModel with a LoraConfig adapter")
    peft_model.save_pretrained(str(where), selected_adapters=[name], save_embedding_layers=False)
    adapter = where if (where / "adapter_config.json").is_file() else where / name
    SvdLoraSpace.from_adapter(adapter, alpha)  # DoRA, modules_to_save, biases: refused here
    return adapter


def _lora_settings(peft_config: Any) -> Any:
    """A `peft.LoraConfig` as essa's `lora:` settings (a function of the model, for target_modules
    "all-linear"); settings essa's SFT would not honour are refused."""
    import peft

    from essa.config import LoraConfig

    if not isinstance(peft_config, peft.LoraConfig):
        raise EssaError(f"peft_config is a {type(peft_config).__name__}; ESSA needs a peft.LoraConfig")
    unsupported = {
        "use_dora": peft_config.use_dora, "use_rslora": peft_config.use_rslora,
        "modules_to_save": peft_config.modules_to_save, "bias": peft_config.bias != "none",
        "rank_pattern": peft_config.rank_pattern, "alpha_pattern": peft_config.alpha_pattern,
        "layers_to_transform": peft_config.layers_to_transform,
        "init_lora_weights": peft_config.init_lora_weights is not True,
    }
    refused = [k for k, v in unsupported.items() if v]
    if refused:
        raise EssaError(f"peft_config sets {', '.join(refused)}, which ESSA's SFT warm start and search do not "
                        "support: use a plain LoRA adapter (r, lora_alpha, target_modules, lora_dropout)")
    targets = peft_config.target_modules

    def settings_for(model: Any) -> LoraConfig:
        if isinstance(targets, str):
            if targets != "all-linear":
                raise EssaError("peft_config.target_modules must be a list of module names or 'all-linear' "
                                f"(got the pattern {targets!r})")
            names = _linear_names(model)
        elif targets is None:
            raise EssaError("peft_config.target_modules is not set: name the linear layers to adapt")
        else:
            names = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
        return LoraConfig(rank=peft_config.r, lora_alpha=float(peft_config.lora_alpha), targets=names,
                          dropout=float(peft_config.lora_dropout))

    return settings_for


def _linear_names(model: Any) -> list[str]:
    from torch import nn

    names: dict[str, None] = {}
    for full, module in model.named_modules():
        if isinstance(module, nn.Linear) and full and not full.endswith("lm_head"):
            names[full.rsplit(".", 1)[-1]] = None
    return list(names)


def _refuse_two_starts(peft_model: bool, peft_config: bool, adapter: bool) -> None:
    """One start for the search: a PeftModel's adapter, args.adapter, or the SFT of peft_config."""
    if peft_model and peft_config:
        raise EssaError("model is a PeftModel, whose adapter is the warm start; peft_config would train "
                        "another one: pass one of the two")
    if peft_model and adapter:
        raise EssaError("model is a PeftModel and args.adapter names another start adapter: pass one of the two")
    if peft_config and adapter:
        raise EssaError("args.adapter is the start adapter; peft_config would train another one first: pass "
                        "one of the two")


def _load(model: Any, cfg: Config, processing_class: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from a model name or a PreTrainedModel."""
    from transformers import PreTrainedModel

    from essa.models import load_model

    if isinstance(model, (str, Path)):
        cfg.model.name = str(model)
        loaded, tokenizer = load_model(cfg.model)
        return loaded, _tokenizer(processing_class, loaded) if processing_class is not None else tokenizer
    if not isinstance(model, PreTrainedModel):
        raise EssaError(f"model must be a model name, a transformers PreTrainedModel or a peft PeftModel "
                        f"(got {type(model).__name__})")
    return model.eval(), _tokenizer(processing_class, model)


def _tokenizer(processing_class: Any, model: Any) -> Any:
    """`processing_class`, else the tokenizer saved with the model, ready to batch prompts."""
    from transformers import AutoTokenizer

    from essa.models import prepare_tokenizer

    tokenizer = processing_class
    if tokenizer is None:
        name = _model_name(model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # noqa: BLE001 - no tokenizer files, offline hub: one line
            raise EssaError(f"could not load the tokenizer of {name!r} ({type(exc).__name__}): pass "
                            "processing_class=tokenizer") from exc
    prepare_tokenizer(tokenizer)
    return tokenizer


def _model_name(model: Any) -> str:
    return str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "model")


def _dtype_name(model: Any, default: str) -> str:
    dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
    return dtype if dtype in ("float32", "bfloat16", "float16") else default


__all__ = ["ESSAConfig", "ESSATrainer", "FIELDS", "reward_name"]
