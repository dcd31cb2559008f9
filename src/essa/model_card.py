"""Model cards for what essa exports, and the upload of an export to the Hugging Face hub.

Every adapter `essa train` writes, and every adapter or merged model `essa export` (and
`ESSATrainer.save_model`) writes, carries a README.md in the hub's format: a YAML header
(base_model, library_name, tags, datasets where known) and a body with the held-out metrics
(with their confidence interval and paired test where the run's summary has them), the ESSA
settings, the search budget, and the command that reproduces the run. The run's resolved config
is written beside the card (`essa_config.yaml`) so that command works as shown.

The card is built from the run directory alone (config.yaml, summary.json, final.json, and for a
run inside `essa demo` the demo's config and summary one level up).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from essa.config import dotted
from essa.errors import EssaError, first_line
from essa.io import atomic_write_text

CARD = "README.md"
CONFIG_COPY = "essa_config.yaml"
SFT_CONFIG_COPY = "essa_sft_config.yaml"
CARD_FILES = (CARD, CONFIG_COPY, SFT_CONFIG_COPY)  # what write_card writes
TAGS = ["essa", "evolution-strategies", "cma-es", "gradient-free", "lora"]
PAPER = "https://arxiv.org/abs/2507.04453"
# Summary fields shown as held-out results besides every `test_*` field.
HELD_OUT_KEYS = ("delta_ci95", "mcnemar_p")
# Task options that name a data source; a value that is a hub dataset id goes into `datasets:`.
_SOURCE_OPTIONS = ("train", "validation", "test", "sft", "train_file", "test_file", "eval_file", "prompts_file",
                   "eval_prompts_file")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class RunRecord:
    """What a run directory says about how its adapter was made."""

    run_dir: Path
    config: dict[str, Any]  # the run's resolved config.yaml
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json (+ the demo's, for a demo run)
    final: dict[str, Any] = field(default_factory=dict)  # final.json
    demo_config: dict[str, Any] | None = None  # the demo's config.yaml, when the run is a demo's ESSA step
    sft_config: dict[str, Any] | None = None  # the config of the `essa sft` run that made the start adapter


def read_run(run_dir: str | Path) -> RunRecord | None:
    """The record of an `essa train` run dir (None for a bare adapter dir without a config)."""
    run_dir = Path(run_dir)
    config = _read_yaml(run_dir / "config.yaml")
    if config is None:
        return None
    record = RunRecord(run_dir, config, _read_json(run_dir / "summary.json"), _read_json(run_dir / "final.json"))
    parent_summary = _read_json(run_dir.parent / "summary.json")
    if "test_accuracy_essa" in parent_summary:  # this run is the ESSA step of `essa demo`
        record.demo_config = _read_yaml(run_dir.parent / "config.yaml")
        record.summary = {**record.summary, **parent_summary}
    record.sft_config = _sft_config(config.get("adapter"))
    return record


def _sft_config(adapter: str | None) -> dict[str, Any] | None:
    """The config of the `essa sft` run whose adapter `adapter` (the dir or its run dir) is, else None."""
    if not adapter:
        return None
    start = Path(adapter)
    adapter_dir = start if (start / "adapter_config.json").is_file() else start / "adapter"
    if not (adapter_dir / "sft_metrics.json").is_file():  # not written by `essa sft`
        return None
    return _read_yaml(adapter_dir.parent / "config.yaml")


def write_card(out_dir: str | Path, record: RunRecord | None, *, merged: bool = False, repo_id: str | None = None,
               evaluation: dict[str, Any] | None = None, base_model: str | None = None) -> Path:
    """Write README.md (and the run's config beside it) into the exported dir `out_dir`."""
    out_dir = Path(out_dir)
    if record is not None:
        config = record.demo_config or record.config
        atomic_write_text(out_dir / CONFIG_COPY, yaml.safe_dump(config, sort_keys=False))
        if record.sft_config is not None and record.demo_config is None:
            atomic_write_text(out_dir / SFT_CONFIG_COPY, yaml.safe_dump(record.sft_config, sort_keys=False))
    text = build_card(record, merged=merged, repo_id=repo_id, evaluation=evaluation, base_model=base_model)
    atomic_write_text(out_dir / CARD, text)
    return out_dir / CARD


def build_card(record: RunRecord | None, *, merged: bool = False, repo_id: str | None = None,
               evaluation: dict[str, Any] | None = None, base_model: str | None = None) -> str:
    """The model card text: hub YAML header + Markdown body."""
    from huggingface_hub import ModelCard, ModelCardData

    config = record.config if record is not None else {}
    model_name = base_model or config.get("model", {}).get("name")
    base_id = _hub_model_id(model_name) if model_name else None
    task = config.get("task", {})
    tags = list(TAGS) + (["peft"] if not merged else []) + ["text-generation"]
    if task.get("name") and re.fullmatch(r"[a-z0-9_-]+", str(task["name"])):
        tags.append(str(task["name"]))
    data = ModelCardData(base_model=base_id, library_name="transformers" if merged else "peft", tags=tags,
                         datasets=_datasets(task) or None, pipeline_tag="text-generation")
    body = _body(record, merged=merged, repo_id=repo_id, base_id=base_id, model_name=model_name,
                 evaluation=evaluation or {})
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an exported directory to the hub model repo `repo_id` (created if missing); returns its URL."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload an ESSA-aligned model")
    except Exception as exc:  # noqa: BLE001 - offline, no token, no permission: one line
        raise EssaError(f"could not push {folder} to the hub repo {repo_id}: {first_line(exc)}") from exc
    return f"https://huggingface.co/{repo_id}"


def check_repo_id(repo_id: str) -> None:
    """EssaError for a string that cannot be a hub repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise EssaError(f"--push-to-hub {repo_id!r} is not a hub repo id (NAMESPACE/NAME): {first_line(exc)}") from exc


# -- the body ------------------------------------------------------------------------------------
def _body(record: RunRecord | None, *, merged: bool, repo_id: str | None, base_id: str | None,
          model_name: str | None, evaluation: dict[str, Any]) -> str:
    config = record.config if record is not None else {}
    what = "model (the adapter merged into the base weights)" if merged else "LoRA adapter"
    task = config.get("task", {}).get("name", "an unknown task")
    base = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{model_name or 'its base model'}`"
    lines = [f"# ESSA {'model' if merged else 'adapter'}: {task}", "",
             f"A {what} for {base}, aligned on the task `{task}` with ESSA (Evolutionary Strategies for Scalable "
             f"Alignment, [arXiv 2507.04453]({PAPER})): after a LoRA SFT warm start, CMA-ES searched the singular "
             "values of the SVD-decomposed LoRA factors, scoring candidates by the task reward. No gradients: only "
             "forward passes. Made with the `essa` package.", ""]
    lines += _usage(merged, repo_id or "PATH_TO_THIS_DIR", base_id or model_name or "BASE_MODEL")
    lines += _results(record, evaluation)
    if record is not None:
        lines += _settings(record)
        lines += _budget(record)
        lines += _reproduce(record)
    return "\n".join(lines).rstrip() + "\n"


def _usage(merged: bool, where: str, base: str) -> list[str]:
    if merged:
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")']
    else:
        code = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                f'model = PeftModel.from_pretrained(base, "{where}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{base}")']
    return ["## Use it", "", "```python", *code, "```", ""]


def _results(record: RunRecord | None, evaluation: dict[str, Any]) -> list[str]:
    summary = record.summary if record is not None else {}
    held_out = {k: v for k, v in summary.items() if k.startswith("test_") or k in HELD_OUT_KEYS or "ci95" in k}
    rows = [(k, _fmt(v)) for k, v in dotted(held_out).items()]
    lines = ["## Results", ""]
    if rows:
        lines += ["Held-out metrics (never used for training or for choosing the final adapter):", "",
                  "| metric | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], ""]
    elif not evaluation:
        lines += ["No held-out test metrics were recorded with this run: score it with "
                  "`essa eval --config essa_config.yaml adapter=PATH --split test`.", ""]
    if evaluation:
        on_validation = evaluation.get("eval_split") == "validation"
        where = ("the validation prompts, which also chose the final adapter (so not a held-out number)"
                 if on_validation else "the eval_dataset passed to it")
        lines += [f"`ESSATrainer.evaluate()` on {where}:", "", "| metric | value |", "| --- | --- |",
                  *[f"| {k} | {_fmt(v)} |" for k, v in dotted(evaluation).items() if k != "eval_split"], ""]
    validation = (record.final.get("validation_accuracy") if record is not None else None) or {}
    if validation:
        choice = record.final.get("choice")
        rule = record.final.get("rule", "the start unless a challenger beats it with confidence")
        lines += [f"The final adapter (chosen: `{choice}`) follows the rule: {rule}. Accuracy of each "
                  "candidate on the validation examples that judged it:", "",
                  "| final choice | validation accuracy |", "| --- | --- |",
                  *[f"| {k} | {_fmt(v)} |" for k, v in validation.items()], ""]
    return lines


def _settings(record: RunRecord) -> list[str]:
    config = record.config
    essa, lora, decoding = config.get("essa", {}), config.get("lora", {}), config.get("decoding", {})
    model = config.get("model", {})
    rows = [(f"essa.{k}", v) for k, v in essa.items()]
    rows += [(f"decoding.{k}", v) for k, v in decoding.items()]
    rows += [(f"lora.{k}", v) for k, v in (record.sft_config or {}).get("lora", lora).items()]
    rows += [("model.dtype", model.get("dtype")), ("model.quantize", model.get("quantize")),
             ("backend.kind", config.get("backend", {}).get("kind"))]
    if "search_dim" in record.summary:
        rows.append(("search dimensions (trainable singular values)", record.summary["search_dim"]))
    return ["## ESSA settings", "", "| setting | value |", "| --- | --- |",
            *[f"| {k} | {_fmt(v)} |" for k, v in rows], ""]


def _budget(record: RunRecord) -> list[str]:
    essa, summary = record.config.get("essa", {}), record.summary
    generations = summary.get("generations", record.final.get("generations"))
    popsize, prompts = essa.get("popsize"), essa.get("prompts_per_generation")
    rows = [("generations run", generations), ("generations allowed (essa.generations)", essa.get("generations")),
            ("time budget s (essa.time_budget_s)", essa.get("time_budget_s")), ("population", popsize),
            ("prompts per generation", prompts)]
    if isinstance(generations, int) and isinstance(popsize, int) and isinstance(prompts, int):
        rows += [("candidates evaluated", generations * popsize),
                 ("completions decoded for fitness", generations * popsize * prompts)]
    wall = summary.get("essa_wall_clock_s", summary.get("wall_clock_s"))
    rows += [("search wall clock s", wall), ("reward failures", summary.get("reward_failures"))]
    return ["## Search budget", "", "| quantity | value |", "| --- | --- |",
            *[f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None], ""]


def _reproduce(record: RunRecord) -> list[str]:
    config = record.config
    if config.get("task", {}).get("options", {}).get("source") == "python":
        from essa.hf_trainer import ESSAConfig

        args = ESSAConfig.from_config(_config_obj(config), arguments=True).changed()
        output_dir = Path(config.get("output_dir") or ".")
        if args.get("adapter") and Path(args["adapter"]) == output_dir / "sft" / "adapter":
            del args["adapter"]  # the trainer's own SFT warm start, which the script runs again
        shown = ",\n".join(f"        {k}={v!r}" for k, v in args.items())
        lines = ["## Reproduce", "",
                 "This run was made in Python with `essa.ESSATrainer` (its datasets and reward functions were "
                 "Python objects, so no command line can rebuild them). Run the same script; its settings were:", "",
                 "```python", "from essa import ESSAConfig, ESSATrainer", "",
                 "trainer = ESSATrainer(", f"    model={config['model']['name']!r},",
                 f"    reward_funcs=[...],  # {', '.join(config['task']['options'].get('reward_funcs', [])) or '?'}",
                 "    train_dataset=..., eval_dataset=...,", "    args=ESSAConfig(", shown + ("," if shown else ""),
                 "    ),", ")", "trainer.train()", "```", "",
                 f"`{CONFIG_COPY}` beside this card holds every setting of the run."]
        return lines
    if record.demo_config is not None:
        return ["## Reproduce", "", f"`{CONFIG_COPY}` beside this card is the run's resolved config:", "",
                "```bash", f"essa demo --config {CONFIG_COPY} output_dir=demo-run", "```", ""]
    lines = ["## Reproduce", "", f"`{CONFIG_COPY}` beside this card is the run's resolved config.", ""]
    if record.sft_config is not None:
        lines += ["```bash", f"essa sft --config {SFT_CONFIG_COPY} output_dir=sft-run",
                  f"essa train --config {CONFIG_COPY} adapter=sft-run/adapter output_dir=essa-run", "```", ""]
    else:
        lines += [f"The search started from the adapter `{config.get('adapter')}`, which `essa sft` did not make:",
                  "", "```bash", f"essa train --config {CONFIG_COPY} adapter=START_ADAPTER output_dir=essa-run",
                  "```", ""]
    return lines


# -- helpers -------------------------------------------------------------------------------------
def _config_obj(mapping: dict[str, Any]) -> Any:
    from essa.config import config_from_mapping

    return config_from_mapping(mapping)


def _hub_model_id(name: str) -> str | None:
    from essa.models import hub_model_id

    return hub_model_id(str(name))


def _datasets(task: dict[str, Any]) -> list[str]:
    options = task.get("options") or {}
    found = []
    for key in _SOURCE_OPTIONS:
        value = options.get(key)
        if isinstance(value, str) and _HUB_ID.match(value) and not Path(value).expanduser().exists() \
                and not value.lower().endswith((".jsonl", ".json", ".parquet")) and value not in found:
            found.append(value)
    if task.get("name") == "helpsteer2" and not options.get("prompts_file"):
        found.append("nvidia/HelpSteer2")
    return found


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value).replace("|", "\\|")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None
