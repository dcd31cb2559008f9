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

`ESSAConfig` (`essa.hf_config`) has no settings of its own: each field is a setting of a `Config`
section.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from essa.config import Config, TaskConfig
from essa.console import say
from essa.errors import EssaError
from essa.hf_config import FIELDS, ESSAConfig
from essa.sft import is_finished
from essa.svd_space import ADAPTER_CONFIG
from essa.tasks.dataset import DatasetTask, dataset_rows, reward_name


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
            if not (resume and is_finished(adapter)):
                say(f"LoRA SFT warm start (rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}) on "
                    f"{len(self.task.split('sft'))} examples")
                adapter = run_sft(cfg.with_changes(output_dir=str(out / "sft")), progress=self.progress,
                                  model_and_tokenizer=loaded, task=self.task, resume=resume)
            cfg = cfg.with_changes(adapter=str(adapter))
        elif self._start is not None:
            adapter = out / "start_adapter"
            if not (adapter / ADAPTER_CONFIG).is_file():
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
    adapter = where if (where / ADAPTER_CONFIG).is_file() else where / name
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
