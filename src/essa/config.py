"""One typed config for every command: dataclasses, loaded from YAML, overridden by key=value.

The resolved config is saved verbatim into each run directory so a run can be read back and
repeated. Unknown keys and out-of-range values are rejected with an `EssaError` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from essa.errors import EssaError


# Values of model.quantize (essa.quantize implements the non-"none" ones).
QUANTIZE_METHODS = ("none", "int8", "int4")


@dataclass
class ModelConfig:
    # Bundled alias ("smollm2-135m-instruct"), a local HF directory, a hub id, or a .gguf file.
    name: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    # none | int8 | int4: quantized base linears in the local runtime (PyTorch CPU kernels; int8
    # per-token activations x per-channel weights, int4 weight-only in groups of 32); the SVD-LoRA
    # branch and the output head stay in float.
    quantize: str = "none"
    # CPU threads for torch; null leaves torch's default.
    threads: int | None = None


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    seed: int = 0
    # Number of examples in each split (procedural tasks generate exactly this many).
    sft_size: int = 2000
    train_size: int = 1000
    validation_size: int = 64
    test_size: int = 200
    # Task-specific settings (data files, difficulty, ...), passed to the task's constructor.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoraConfig:
    rank: int = 8
    lora_alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dropout: float = 0.0


@dataclass
class SftConfig:
    epochs: float = 1.0
    lr: float = 3e-4
    batch_size: int = 16
    # Caps the number of optimizer steps (null: epochs decide).
    max_steps: int | None = None
    seed: int = 0


@dataclass
class DecodingConfig:
    max_new_tokens: int = 48
    # 0 means greedy decoding.
    temperature: float = 0.0
    top_p: float = 1.0
    # Rows (candidate x prompt pairs) per batched forward pass.
    batch_size: int = 64


@dataclass
class SearchConfig:
    # Fraction of each factor's singular values that are trainable (the paper's alpha).
    alpha: float = 1.0
    optimizer: str = "cma"  # cma | sep-cma | openai-es
    popsize: int = 16
    sigma0: float = 0.05
    # Training prompts per generation, shared by all candidates (the paper's "batch size").
    prompts_per_generation: int = 16
    generations: int | None = 20
    time_budget_s: float | None = None
    # Validate the optimizer mean every this many generations (0: only at the end).
    eval_every: int = 5
    seed: int = 0
    # OpenAI-ES only: Adam learning rate on the mean.
    openai_es_lr: float = 0.02


@dataclass
class BackendConfig:
    # local: this process (population-batched runtime); vllm: a vLLM engine in this process's
    # care, one LoRA request per candidate; ray: a pool of Ray workers (paper Alg. 1).
    kind: str = "local"
    workers: int = 2
    # Address of an existing Ray cluster; null starts a local one.
    ray_address: str | None = None
    threads_per_worker: int = 1
    # What each Ray worker runs: transformers (the population runtime) or vllm.
    worker_engine: str = "transformers"
    # Extra keyword arguments for vllm.LLM (quantization, max_model_len, gpu_memory_utilization, ...).
    vllm_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    essa: SearchConfig = field(default_factory=SearchConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    # SFT adapter directory that `essa train` / `essa eval` start from.
    adapter: str | None = None
    output_dir: str = "runs/essa"

    def validate(self) -> Config:
        _check(0.0 < self.essa.alpha <= 1.0, "essa.alpha must be in (0, 1]", self.essa.alpha)
        _check(self.essa.popsize >= 2, "essa.popsize must be >= 2", self.essa.popsize)
        _check(self.essa.sigma0 > 0, "essa.sigma0 must be > 0", self.essa.sigma0)
        _check(
            self.essa.optimizer in ("cma", "sep-cma", "openai-es"),
            "essa.optimizer must be one of cma, sep-cma, openai-es",
            self.essa.optimizer,
        )
        _check(
            self.essa.prompts_per_generation >= 1,
            "essa.prompts_per_generation must be >= 1",
            self.essa.prompts_per_generation,
        )
        _check(
            self.essa.generations is not None or self.essa.time_budget_s is not None,
            "set essa.generations or essa.time_budget_s (or both)",
            None,
        )
        _check(self.backend.kind in ("local", "ray", "vllm"), "backend.kind must be local, ray or vllm",
               self.backend.kind)
        _check(self.backend.worker_engine in ("transformers", "vllm"),
               "backend.worker_engine must be transformers or vllm", self.backend.worker_engine)
        _check(self.model.quantize == "none" or self._engine() == "transformers",
               "model.quantize applies to the transformers runtime; with vLLM set "
               "backend.vllm_options.quantization instead", self.model.quantize)
        _check(self.backend.workers >= 1, "backend.workers must be >= 1", self.backend.workers)
        _check(self.lora.rank >= 1, "lora.rank must be >= 1", self.lora.rank)
        _check(bool(self.lora.targets), "lora.targets must not be empty", self.lora.targets)
        _check(self.decoding.max_new_tokens >= 1, "decoding.max_new_tokens must be >= 1",
               self.decoding.max_new_tokens)
        _check(self.decoding.batch_size >= 1, "decoding.batch_size must be >= 1",
               self.decoding.batch_size)
        _check(self.decoding.temperature >= 0, "decoding.temperature must be >= 0",
               self.decoding.temperature)
        _check(self.model.quantize in QUANTIZE_METHODS,
               f"model.quantize must be one of {', '.join(QUANTIZE_METHODS)}", self.model.quantize)
        _check(self.model.dtype in ("float32", "bfloat16", "float16"),
               "model.dtype must be float32, bfloat16 or float16", self.model.dtype)
        return self

    def _engine(self) -> str:
        """The inference engine that evaluates candidates: transformers or vllm."""
        if self.backend.kind == "vllm" or (self.backend.kind == "ray" and self.backend.worker_engine == "vllm"):
            return "vllm"
        return "transformers"

    def with_changes(self, **changes: Any) -> Config:
        """A deep copy with the given top-level fields replaced; `self` is left as it is."""
        out = copy.deepcopy(self)
        for key, value in changes.items():
            setattr(out, key, value)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from essa.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check(ok: bool, message: str, value: Any) -> None:
    if not ok:
        raise EssaError(message + ("" if value is None else f" (got {value!r})"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: Config | None = None) -> Config:
    """Defaults (or `base`) <- YAML file <- `key=value` overrides, then validated."""
    data = read_yaml_mapping(Path(path)) if path is not None else {}
    return config_from_mapping(data, overrides, base=base)


def config_from_mapping(data: dict[str, Any], overrides: list[str] | None = None,
                        base: Config | None = None) -> Config:
    """`load_config` on a mapping already read (shaped like the YAML file)."""
    merged = dataclasses.asdict(base or Config())
    merge_mapping(merged, data)
    merge_overrides(merged, overrides or [])
    return _build(Config, merged, prefix="").validate()


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """A config dataclass `cls` from its defaults updated by `data`, keys checked and values
    coerced as for `Config`; `prefix` ("grpo.") names the section in error messages."""
    merged = dataclasses.asdict(cls())
    merge_mapping(merged, data, prefix=prefix)
    return _build(cls, merged, prefix=prefix)


def merge_overrides(dst: dict[str, Any], overrides: list[str], prefix: str = "") -> None:
    """Apply `key.sub=value` overrides (values read as YAML) to the nested mapping `dst`."""
    for item in overrides:
        key, value = parse_override(item)
        merge_mapping(dst, _nest(key, value), prefix=prefix)


def merge_mapping(dst: dict[str, Any], src: dict[str, Any], prefix: str = "") -> None:
    """Update the nested mapping `dst` from `src`, rejecting keys `dst` does not have."""
    for key, value in src.items():
        name = f"{prefix}{key}"
        if key not in dst:
            known = ", ".join(sorted(dst))
            raise EssaError(f"unknown config key '{name}' (known at this level: {known})")
        if isinstance(dst[key], dict) and not _is_free_mapping(name):
            if not isinstance(value, dict):
                raise EssaError(f"config key '{name}' is a section; give its keys, e.g. {name}.KEY=VALUE")
            merge_mapping(dst[key], value, prefix=f"{name}.")
        else:
            dst[key] = value


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds ({} for an empty file)."""
    if not path.is_file():
        raise EssaError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EssaError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise EssaError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` as (key, value), the value read as YAML (a bad YAML value stays a string)."""
    if "=" not in item:
        raise EssaError(f"override {item!r} must look like key=value (e.g. essa.popsize=32)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _is_free_mapping(name: str) -> bool:
    # task.options is a user-defined mapping: any keys are allowed inside it.
    return name == "task.options"


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{name}.")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise EssaError(f"config key '{name}' must be a list, got {value!r}")
        return [_coerce(args[0], v, name) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise EssaError(f"config key '{name}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise EssaError(f"config key '{name}' must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EssaError(f"config key '{name}' must be a number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise EssaError(f"config key '{name}' must be an integer, got {value!r}")
        return tp(value)
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise EssaError(f"config key '{name}' must be a string, got {value!r}")
        return str(value)
    return value
