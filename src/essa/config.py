"""One typed config for every command: dataclasses, loaded from YAML, overridden by key=value.

Each section is a dataclass that declares its fields with a default and a help text (`setting`)
and checks them when it is built, so a setting's default, help and check live in one place;
errors name the key as the user wrote it. `settings()` lists every key with its default and help
(for `essa COMMAND --help`, the docs and `essa.ESSAConfig`, which derives its fields from these
sections). The resolved config is saved verbatim into each run directory so a run can be read
back and repeated.

Longer than the package's other modules on purpose: it is the one place where every setting is
declared, with its help text beside it (about half of its lines); the loading code is at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from essa.backends import available_backends
from essa.errors import EssaError
from essa.optim import CmaOptions, check_optimizer_options, optimizer_names
from essa.probe import SIGMA0_RULES
from essa.svd_space import OFFSET_MODES, SHARE_AXES

# Values of model.quantize (essa.quantize implements the non-"none" ones).
QUANTIZE_METHODS = ("none", "int8", "int4")
# Values of decoding.engine (essa.backends.local implements them).
DECODING_ENGINES = ("essa", "generate")
# Values of model.dtype: torch dtype names.
DTYPES = ("float32", "bfloat16", "float16", "auto")
# Values of compare.svd_vectors.
SVD_VECTORS = ("sft", "random")
# Points of a search that may replace its start as the final adapter (essa.trainer._finish).
FINAL_CHALLENGERS = ("mean", "best_validated_mean", "best_candidate")
# Values of grpo.loss_type (TRL's loss aggregations).
GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
MEAN_STEPS = ("full", "signal")
# The real benchmarks of essa.suite (its registry holds how each is read and scored).
SUITE_BENCHMARKS = ("gsm8k", "math500", "svamp", "asdiv", "mawps", "ifeval", "ifbench")
# A number in exponent notation, such as 3e-5, which YAML 1.1 leaves a string.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check(key: str, ok: bool, rule: str, value: Any) -> None:
    """Raise an EssaError naming the config key when `ok` is false."""
    if not ok:
        raise EssaError(f"{key} {rule} (got {value!r})")


def _one_of(choices: Any) -> str:
    return f"must be one of {', '.join(choices)}"


def setting(default: Any, help: str) -> Any:
    """A config field: its default and its help text side by side. The help is what
    `essa COMMAND --help`, `essa.ESSAConfig` and the docs show; the section's `__post_init__`
    holds the check."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """The `model:` section: the base model and how it is loaded."""

    name: str = setting("smollm2-135m-instruct", "Bundled alias (smollm2-135m-instruct), a local Hugging Face "
                        "model directory, a hub id, or a .gguf file.")
    dtype: str = setting("float32", "float32 | bfloat16 | float16 | auto (bfloat16 for inference on a GPU or on "
                         "CPUs with bf16 matrix instructions (AMX or AVX-512 BF16), where it is 1.8-2.4x faster "
                         "at unchanged accuracy; float32 elsewhere and for SFT/GRPO training).")
    quantize: str = setting("none", "none | int8 | int4: quantized base linears in the local runtime (PyTorch CPU "
                            "kernels; int8 per-token activations x per-channel weights, int4 weight-only in groups "
                            "of 32); the SVD-LoRA branch and the output head stay in float.")
    threads: int | None = setting(None, "CPU threads for torch (and for a vLLM CPU engine); null leaves the default.")

    def __post_init__(self) -> None:
        _check("model.dtype", self.dtype in DTYPES, _one_of(DTYPES), self.dtype)
        _check("model.quantize", self.quantize in QUANTIZE_METHODS, _one_of(QUANTIZE_METHODS), self.quantize)
        _check("model.threads", self.threads is None or self.threads >= 1, "must be >= 1 or null", self.threads)


@dataclass
class TaskConfig:
    """The `task:` section: prompts and reward (a registered name, file.py:factory or module:factory)."""

    name: str = setting("arithmetic", "The task: a registered name (arithmetic, gsm8k, math, ifeval, reward_model, "
                        "helpsteer2, dataset), path/to/file.py:factory or module:factory.")
    seed: int = setting(0, "Seed of the task's data: which prompts go to which split.")
    sft_size: int = setting(2000, "Examples in the sft split (procedural tasks generate exactly this many).")
    train_size: int = setting(1000, "Examples in the train split (the prompts ESSA's mini-batches are drawn from).")
    validation_size: int = setting(64, "Examples in the validation split (selects the final adapter). The dataset "
                                   "task holds this many out of its train data when it has no validation source.")
    test_size: int = setting(200, "Examples in the held-out test split.")
    options: dict[str, Any] = setting({}, "Task-specific settings (data files, difficulty, reward functions, ...), "
                                      "passed to the task's constructor.")

    def __post_init__(self) -> None:
        for split in ("sft", "train", "validation", "test"):
            size = getattr(self, f"{split}_size")
            _check(f"task.{split}_size", size >= 0, "must be >= 0", size)


@dataclass
class LoraConfig:
    """The `lora:` section: the adapter the SFT warm start trains (and ESSA then searches)."""

    rank: int = setting(8, "LoRA rank r.")
    lora_alpha: float = setting(16.0, "LoRA alpha (the update is scaled by lora_alpha / rank).")
    targets: list[str] = setting(["q_proj", "k_proj", "v_proj", "o_proj"],
                                 "Names of the linear layers to adapt (last name component, e.g. q_proj).")
    dropout: float = setting(0.0, "LoRA dropout during SFT.")

    def __post_init__(self) -> None:
        _check("lora.rank", self.rank >= 1, "must be >= 1", self.rank)
        _check("lora.lora_alpha", self.lora_alpha > 0, "must be > 0", self.lora_alpha)
        _check("lora.targets", bool(self.targets), "must not be empty", self.targets)
        _check("lora.dropout", 0 <= self.dropout < 1, "must be in [0, 1)", self.dropout)


@dataclass
class SftConfig:
    """The `sft:` section: the LoRA SFT warm start."""

    epochs: float = setting(1.0, "Passes over the sft split.")
    lr: float = setting(1e-3, "AdamW learning rate (linear warmup over 10% of the steps, then linear decay).")
    batch_size: int = setting(8, "Examples per optimizer step.")
    max_steps: int | None = setting(None, "Caps the number of optimizer steps (null: epochs decide).")
    seed: int = setting(0, "Seed of the LoRA initialization and the batch order.")
    max_length: int = setting(256, "Longest training sequence in tokens (prompt + target); longer ones are cut "
                              "(real GSM8K solutions need about 384).")
    patience: int | None = setting(None, "Early stopping: stop once the validation loss has not improved for this "
                                   "many checks and keep the adapter of the best check; `epochs` is then the "
                                   "ceiling (null: train all epochs).")
    eval_every: int = setting(25, "Early stopping: optimizer steps between validation-loss checks.")
    validation_examples: int = setting(64, "Early stopping: examples of the task's validation split (with their "
                                       "reference solutions) whose loss is checked.")
    bf16_autocast: bool = setting(False, "Run the forward pass under bf16 autocast (LoRA weights and optimizer stay "
                                  "float32): about 1.8x faster on CPUs with bf16 instructions, not bit-identical "
                                  "to float32 training.")

    def __post_init__(self) -> None:
        _check("sft.epochs", self.epochs > 0, "must be > 0", self.epochs)
        _check("sft.max_length", self.max_length >= 8, "must be >= 8", self.max_length)
        _check("sft.patience", self.patience is None or self.patience >= 1, "must be >= 1 or null", self.patience)
        _check("sft.eval_every", self.eval_every >= 1, "must be >= 1", self.eval_every)
        _check("sft.validation_examples", self.validation_examples >= 1, "must be >= 1", self.validation_examples)
        _check("sft.lr", self.lr > 0, "must be > 0", self.lr)
        _check("sft.batch_size", self.batch_size >= 1, "must be >= 1", self.batch_size)
        _check("sft.max_steps", self.max_steps is None or self.max_steps >= 1, "must be >= 1 or null",
               self.max_steps)


@dataclass
class DecodingConfig:
    """How completions are decoded: for ESSA's fitness and for every evaluation."""

    max_new_tokens: int = setting(48, "Longest completion, in tokens.")
    temperature: float = setting(0.0, "Sampling temperature; 0 means greedy decoding.")
    top_p: float = setting(1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability.")
    batch_size: int = setting(64, "Rows (candidate x prompt pairs) per batched forward pass.")
    engine: str = setting("essa", "essa: our decoding loop (shared prompt prefix, finished rows leave, one random "
                          "stream per row); generate: HF `generate`, the reference path.")
    pack_weights: bool = setting(True, "Engine essa on CPU (fp32 or bf16): run the linear layers with weights "
                                 "packed once in oneDNN's layout (faster decoding, one more copy of the weights in "
                                 "memory; the same products up to summation order).")
    parallel_batches: int | None = setting(None, "Engine essa on CPU: batches decoded at the same time, each on its "
                                           "own thread with a share of model.threads (null: one per thread, at most "
                                           "one per batch of rows; 1: one batch after another).")

    def __post_init__(self) -> None:
        _check("decoding.max_new_tokens", self.max_new_tokens >= 1, "must be >= 1", self.max_new_tokens)
        _check("decoding.temperature", self.temperature >= 0, "must be >= 0", self.temperature)
        _check("decoding.top_p", 0 < self.top_p <= 1, "must be in (0, 1]", self.top_p)
        _check("decoding.batch_size", self.batch_size >= 1, "must be >= 1", self.batch_size)
        _check("decoding.parallel_batches", self.parallel_batches is None or self.parallel_batches >= 1,
               "must be >= 1 or null", self.parallel_batches)
        _check("decoding.engine", self.engine in DECODING_ENGINES, _one_of(DECODING_ENGINES), self.engine)


@dataclass
class SearchConfig:
    """The `essa:` section: the ES search over singular-value offsets."""

    alpha: float = setting(1.0, "Fraction of each factor's singular values that are trainable (the paper's "
                           "alpha), in (0, 1].")
    offsets: str = setting("relative", "How an offset z moves its singular value s: relative (s * exp(z): one step "
                           "size fits factors of any scale, values stay positive) or additive (s + z, the paper's "
                           "form).")
    share: list[str] = setting(["layers", "values", "factors"], "Offsets shared across `layers` (one per module type and factor), `modules` (one "
                               "per layer), `values` (one per factor) and/or `factors` (A and B alike): fewer "
                               "dimensions for small populations (a departure from the paper; the default, one scale per "
                               "module type's LoRA delta, is the setting docs/BENCHMARKS.md measured a gain with); [] "
                               "searches every singular value, as the paper does.")
    layer_groups: int = setting(1, "With layers in share: split the layers into this many contiguous blocks, each "
                                "with its own offsets (1: one offset for all layers).")
    optimizer: str = setting("sep-cma", "A name from the optimizer registry (essa.optim): cma | sep-cma | openai-es.")
    optimizer_options: dict[str, Any] = setting({}, "Options of the chosen optimizer, e.g. {lr: 0.02} for "
                                                "openai-es (each optimizer lists its own).")
    popsize: int = setting(8, "Candidates per generation (the population lambda).")
    sigma0: float | str = setting(0.8, "Initial step size on the singular-value offsets, or auto: chosen by a short "
                                  "probe of the signal around the start by essa.sigma0_rule (essa.probe).")
    sigma0_rule: str = setting("harm", "With sigma0 auto: harm (the largest of 0.1, 0.2, 0.4, 0.8 whose candidates "
                               "do not lose to the start beyond noise; works at any start accuracy) or flips (the "
                               "smallest that flips 10% of rewards; unreachable near a 10% start).")
    prompts_per_generation: int = setting(32, "Training prompts per generation, shared by all candidates (the "
                                          "paper's \"batch size\").")
    generations: int | None = setting(20, "Generations (ES steps) to run; null: only time_budget_s decides.")
    time_budget_s: float | None = setting(None, "Search seconds (validation not counted); the run stops at "
                                          "whichever budget comes first. null: no time budget.")
    mean_step: str = setting("full", "How far each generation moves the optimizer's mean: full (as the optimizer "
                             "would) or signal (scaled by the share of the candidates' fitness variance the two "
                             "halves of the prompts agree on: about 0 on pure noise, so the mean stays near the "
                             "start instead of drifting; an addition to the paper's method, measured in "
                             "benchmarks/noise_drift.py).")
    eval_every: int = setting(4, "Validate the optimizer mean every this many generations (0: only at the start "
                              "and the end).")
    final_challengers: list[str] = setting(list(FINAL_CHALLENGERS), "Points that may replace the start (the SFT "
                                           "adapter) as the final adapter, each only if it beats the start on "
                                           "validation with confidence: mean (the optimizer's final mean), "
                                           "best_validated_mean (the best mean of the in-loop validations), "
                                           "best_candidate (the fittest candidate on its mini-batch). Each one "
                                           "costs a validation; one alone is a single pre-set comparison, with no "
                                           "best-of-several selection on the validation split.")
    guard_sets: list[str] = setting([], "Do no harm beyond the training distribution: real benchmarks (from "
                                    + ", ".join(SUITE_BENCHMARKS) + ") a challenger that wins on validation must "
                                    "also not lose on, against the start, beyond noise (paired 95% interval below "
                                    "zero); else the next challenger is asked, then the start is kept. Scored "
                                    "greedily with the run's decoding settings. Empty: no guard.")
    guard_limit: int = setting(200, "Examples of each guard set (the first N of the suite's seeded shuffle).")
    seed: int = setting(0, "Seed of the optimizer, the mini-batches and the sampling streams.")

    def __post_init__(self) -> None:
        _check("essa.alpha", 0.0 < self.alpha <= 1.0, "must be in (0, 1]", self.alpha)
        for name in self.guard_sets:
            _check("essa.guard_sets", name in SUITE_BENCHMARKS, _one_of(SUITE_BENCHMARKS), name)
        _check("essa.guard_limit", self.guard_limit >= 1, "must be >= 1", self.guard_limit)
        _check("essa.offsets", self.offsets in OFFSET_MODES, _one_of(OFFSET_MODES), self.offsets)
        _check("essa.share", set(self.share) <= set(SHARE_AXES), f"takes a list of {', '.join(SHARE_AXES)}",
               self.share)
        _check("essa.layer_groups", isinstance(self.layer_groups, int) and self.layer_groups >= 1
               and (self.layer_groups == 1 or "layers" in self.share), "must be an integer >= 1, and > 1 only with "
               "layers in essa.share", self.layer_groups)
        _check("essa.optimizer", self.optimizer in optimizer_names(), _one_of(optimizer_names()), self.optimizer)
        options = check_optimizer_options(self.optimizer, self.optimizer_options)
        _check("essa.popsize", self.popsize >= 2, "must be >= 2", self.popsize)
        _check("essa.popsize", not (isinstance(options, CmaOptions) and options.mirrored) or self.popsize % 2 == 0,
               "must be even for mirrored sampling (or set essa.optimizer_options.mirrored: false)", self.popsize)
        _check("essa.sigma0", self.sigma0 == "auto" or (not isinstance(self.sigma0, str) and self.sigma0 > 0),
               'must be > 0 or "auto"', self.sigma0)
        _check("essa.sigma0_rule", self.sigma0_rule in SIGMA0_RULES, _one_of(SIGMA0_RULES), self.sigma0_rule)
        _check("essa.prompts_per_generation", self.prompts_per_generation >= 1, "must be >= 1",
               self.prompts_per_generation)
        _check("essa.generations", self.generations is None or self.generations >= 1, "must be >= 1 or null",
               self.generations)
        _check("essa.time_budget_s", self.time_budget_s is None or self.time_budget_s >= 0,
               "must be >= 0 or null", self.time_budget_s)
        if self.generations is None and self.time_budget_s is None:
            raise EssaError("set essa.generations or essa.time_budget_s (or both)")
        _check("essa.eval_every", self.eval_every >= 0, "must be >= 0", self.eval_every)
        _check("essa.mean_step", self.mean_step in MEAN_STEPS, _one_of(MEAN_STEPS), self.mean_step)
        _check("essa.final_challengers", isinstance(self.final_challengers, list) and self.final_challengers
               and set(self.final_challengers) <= set(FINAL_CHALLENGERS)
               and len(set(self.final_challengers)) == len(self.final_challengers),
               f"takes a non-empty list of distinct names from {', '.join(FINAL_CHALLENGERS)}", self.final_challengers)
        _check("essa.final_challengers", self.final_challengers != ["best_validated_mean"] or self.eval_every > 0,
               "names only best_validated_mean, which needs in-loop validation (essa.eval_every > 0)",
               self.final_challengers)
        _check("essa.seed", 0 <= self.seed < 2**32, "must be in [0, 2**32)", self.seed)


@dataclass
class BackendConfig:
    """The `backend:` section: which backend evaluates the candidates, from the registry in essa.backends."""

    kind: str = setting("local", "local: this process (population-batched runtime); vllm: a vLLM engine, one LoRA "
                        "request per candidate; ray: a pool of Ray workers (paper Alg. 1), each running "
                        "worker_engine.")
    workers: int = setting(2, "ray: workers, each holding the model once.")
    ray_address: str | None = setting(None, "ray: address of an existing Ray cluster; null starts a local one.")
    threads_per_worker: int = setting(1, "ray: CPU threads (and Ray CPUs) of each worker.")
    worker_engine: str = setting("local", "ray: the backend each worker runs in its own process (local | vllm).")
    chunk_timeout_s: float | None = setting(1800.0, "ray: seconds one chunk of candidates may take before its "
                                            "worker counts as hung, is replaced and the chunk re-queued (null: "
                                            "wait forever).")
    vllm_options: dict[str, Any] = setting({}, "vllm: extra keyword arguments for vllm.LLM (quantization, "
                                           "max_model_len, ...).")

    def __post_init__(self) -> None:
        kinds = available_backends()
        _check("backend.kind", self.kind in kinds, _one_of(kinds), self.kind)
        _check("backend.worker_engine", self.worker_engine in kinds, _one_of(kinds), self.worker_engine)
        _check("backend.workers", self.workers >= 1, "must be >= 1", self.workers)
        _check("backend.threads_per_worker", self.threads_per_worker >= 1, "must be >= 1", self.threads_per_worker)
        _check("backend.chunk_timeout_s", self.chunk_timeout_s is None or self.chunk_timeout_s > 0,
               "must be > 0 or null", self.chunk_timeout_s)


@dataclass
class SuiteConfig:
    """The `suite:` section: the real benchmarks that `essa eval --suite` and a demo's transfer check
    score (essa.suite)."""

    sets: list[str] = setting([], "Real benchmarks to score: " + ", ".join(SUITE_BENCHMARKS) + " (empty: none; "
                              "the demo then skips its transfer check).")
    limit: int | None = setting(None, "Examples per benchmark: the first N of a fixed seeded shuffle of its test "
                                "set (null: all of it).")
    max_new_tokens: int | None = setting(None, "Longest completion on every benchmark (null: each benchmark's "
                                         "own, long enough for its reference solutions).")

    def __post_init__(self) -> None:
        for name in self.sets:
            _check("suite.sets", name in SUITE_BENCHMARKS, _one_of(SUITE_BENCHMARKS), name)
        _check("suite.sets", len(set(self.sets)) == len(self.sets), "must not repeat a benchmark", self.sets)
        _check("suite.limit", self.limit is None or self.limit >= 1, "must be >= 1 or null", self.limit)
        _check("suite.max_new_tokens", self.max_new_tokens is None or self.max_new_tokens >= 1,
               "must be >= 1 or null", self.max_new_tokens)


@dataclass
class CompareConfig:
    """The `compare:` section of `essa compare` (ESSA vs GRPO, and optionally continued SFT, from the same
    start)."""

    budget_s: float = setting(1380.0, "Wall-clock seconds of training for each method.")
    checkpoints: int = setting(4, "Matched snapshots at budget * k / checkpoints, k = 1..checkpoints (plus t = 0 "
                               "and the end).")
    max_steps: int | None = setting(None, "Optional cap on ESSA generations, GRPO steps and continued-SFT steps "
                                    "(null: the budget alone decides).")
    svd_vectors: str = setting("sft", "Singular vectors of the start adapter: the SFT adapter's own (sft) or "
                               "random orthonormal ones (random).")
    seed: int = setting(0, "Seed of the random singular vectors.")
    isolate: bool = setting(True, "Run each job (SFT, ESSA, GRPO, continued SFT) in a fresh spawned process "
                            "(separable peak memory).")
    sft_arm: bool = setting(False, "Also continue the start adapter's LoRA SFT (the task's sft split, sft.lr constant, "
                            "sft.batch_size) for the same budget and snapshot times: the common-sense arm, scored "
                            "like the others. Needs a task whose sft split has targets.")

    def __post_init__(self) -> None:
        _check("compare.budget_s", self.budget_s > 0, "must be > 0", self.budget_s)
        _check("compare.checkpoints", self.checkpoints >= 1, "must be >= 1", self.checkpoints)
        _check("compare.max_steps", self.max_steps is None or self.max_steps >= 1, "must be >= 1 or null",
               self.max_steps)
        _check("compare.svd_vectors", self.svd_vectors in SVD_VECTORS, _one_of(SVD_VECTORS), self.svd_vectors)

    def checkpoint_times(self) -> list[float]:
        """Seconds on each method's training clock at which it snapshots its model."""
        return [self.budget_s * k / self.checkpoints for k in range(1, self.checkpoints + 1)]


@dataclass
class GrpoConfig:
    """The `grpo:` section: the gradient baseline of `essa compare` (TRL's GRPOTrainer)."""

    num_generations: int = setting(8, "Group size G: completions sampled per prompt (advantages are "
                                   "group-relative).")
    prompts_per_step: int | None = setting(None, "Distinct prompts per optimizer step (null: "
                                           "essa.prompts_per_generation).")
    lr: float = setting(1e-4, "AdamW learning rate, constant (the budget is wall-clock: no step count to decay "
                        "over).")
    lr_sweep: list[float] = setting([], "Learning rates to try, one GRPO run each from the same start and prompt "
                                    "stream; the run with the highest validation accuracy of its final snapshot is "
                                    "the one compared with ESSA (test never selects). []: grpo.lr alone.")
    beta: float = setting(0.0, "KL coefficient against the start adapter (0: TRL's default, no reference pass).")
    temperature: float = setting(1.0, "Sampling temperature of the rollouts (GRPO needs varied completions per "
                                 "group; reported accuracy is greedy).")
    top_p: float = setting(1.0, "Nucleus sampling of the rollouts.")
    micro_batch_size: int | None = setting(None, "Completions per forward/backward pass (gradient accumulation); "
                                           "null: the whole step at once.")
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass (less memory).")
    loss_type: str = setting("dapo", "TRL's loss aggregation: dapo (TRL's default) | grpo (the original "
                             "per-sequence mean) | bnpo | dr_grpo.")
    svd_only: bool = setting(False, "SVD-GRPO: only the singular-value offsets of essa.alpha's trainable singular "
                             "values learn.")
    seed: int = setting(0, "Seed of the GRPO run.")

    def __post_init__(self) -> None:
        _check("grpo.num_generations", self.num_generations >= 2,
               "must be >= 2 (GRPO compares completions within a group)", self.num_generations)
        _check("grpo.prompts_per_step", self.prompts_per_step is None or self.prompts_per_step >= 1,
               "must be >= 1 or null", self.prompts_per_step)
        _check("grpo.lr", self.lr > 0, "must be > 0", self.lr)
        _check("grpo.lr_sweep", all(lr > 0 for lr in self.lr_sweep), "takes learning rates > 0 ([]: grpo.lr alone)",
               self.lr_sweep)
        _check("grpo.lr_sweep", len(set(self.lr_sweep)) == len(self.lr_sweep), "must not repeat a learning rate",
               self.lr_sweep)
        _check("grpo.beta", self.beta >= 0, "must be >= 0", self.beta)
        _check("grpo.temperature", self.temperature > 0, "must be > 0 (GRPO samples its rollouts)",
               self.temperature)
        _check("grpo.top_p", 0 < self.top_p <= 1, "must be in (0, 1]", self.top_p)
        _check("grpo.micro_batch_size", self.micro_batch_size is None or self.micro_batch_size >= 1,
               "must be >= 1 or null", self.micro_batch_size)
        _check("grpo.loss_type", self.loss_type in GRPO_LOSS_TYPES, _one_of(GRPO_LOSS_TYPES), self.loss_type)

    @property
    def learning_rates(self) -> list[float]:
        """The learning rates `essa compare` runs GRPO with: grpo.lr_sweep, or grpo.lr alone."""
        return list(self.lr_sweep) or [self.lr]


@dataclass
class TrackingConfig:
    """The `tracking:` section: the experiment trackers `essa train` reports to (TRL's report_to)."""

    report_to: list[str] = setting([], "Experiment trackers, several at once: none | tensorboard | wandb | "
                                   "trackio (each an optional extra: pip install 'essa[tensorboard]'). They log "
                                   "every number of each generation's record, validation accuracy and wall clock; "
                                   "wandb and trackio also a table of completion samples.")
    project: str = setting("essa", "wandb / trackio project name.")
    run_name: str | None = setting(None, "Run name in the trackers (null: the output directory's name).")
    logging_dir: str | None = setting(None, "TensorBoard event directory (null: OUTPUT_DIR/tensorboard).")
    offline: bool = setting(False, "wandb: log to local files only (mode=offline; upload later with `wandb sync`). "
                            "TensorBoard and trackio always log locally.")
    log_completions: int = setting(4, "Completion samples per generation in the trackers' tables (the best "
                                   "candidate's rollouts); 0: none.")

    def __post_init__(self) -> None:
        from essa.tracking import tracker_names

        if isinstance(self.report_to, str):  # report_to="tensorboard,wandb", as TRL accepts
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        names = tracker_names()
        for name in self.report_to:
            _check("tracking.report_to", name in (*names, "none"), _one_of(("none", *names)), name)
        if "none" in self.report_to:
            _check("tracking.report_to", self.report_to == ["none"], "cannot combine none with a tracker",
                   self.report_to)
            self.report_to = []
        _check("tracking.log_completions", self.log_completions >= 0, "must be >= 0", self.log_completions)


@dataclass
class Config:
    """Every setting of every command, one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    essa: SearchConfig = field(default_factory=SearchConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    adapter: str | None = setting(None, "SFT adapter directory that `essa train` / `essa eval` / `essa compare` "
                                  "start from.")
    output_dir: str = setting("runs/essa", "Where the command writes its run directory.")

    def __post_init__(self) -> None:
        # Checks that span sections.
        rollouts = self.grpo_prompts_per_step * self.grpo.num_generations
        micro = self.grpo.micro_batch_size
        _check("grpo.micro_batch_size", micro is None or rollouts % micro == 0,
               f"must divide the rollouts of a step, prompts_per_step x num_generations = "
               f"{self.grpo_prompts_per_step} x {self.grpo.num_generations} = {rollouts}", micro)

    @property
    def grpo_prompts_per_step(self) -> int:
        """Prompts per GRPO step: grpo.prompts_per_step, by default ESSA's prompts per generation."""
        return self.grpo.prompts_per_step or self.essa.prompts_per_generation

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


@dataclass(frozen=True)
class Setting:
    """One leaf setting of a config dataclass, as `settings()` lists it."""

    key: str  # dotted, as in YAML and key=value overrides, e.g. "essa.popsize"
    type: Any
    default: Any
    help: str
    section: type  # the dataclass that declares (and checks) it
    name: str  # its field name in `section`


def settings(cls: type | None = None, prefix: str = "") -> list[Setting]:
    """Every leaf setting of the config dataclass `cls` (default: `Config`) and its sections, in
    declaration order, with its default and help text."""
    cls = Config if cls is None else cls
    hints = typing.get_type_hints(cls)
    out: list[Setting] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += settings(tp, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(Setting(f"{prefix}{f.name}", tp, default, f.metadata.get("help", ""), cls, f.name))
    return out


def describe_settings(sections: tuple[str, ...] | None = None, width: int = 100, cls: type | None = None,
                      prefix: str = "") -> str:
    """The keys of `cls` (default `Config`; only those of the top-level `sections`, if given) with
    default and help, as `essa COMMAND --help` shows them."""
    import textwrap

    lines = []
    for s in settings(cls, prefix):
        top = s.key[len(prefix):].split(".")[0]
        if sections is not None and top not in sections:
            continue
        lines.append(f"  {s.key} = {_show(s.default)}")
        lines += textwrap.wrap(s.help, width=width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"section.key": value}, keys as `key=value` overrides spell them."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
    for item in overrides or []:
        key, value = parse_override(item)
        merge_mapping(merged, _nest(key, value))
    return _build(Config, merged, prefix="")


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """A config dataclass `cls` from its defaults updated by `data`, keys checked and values
    coerced as for `Config`; `prefix` ("essa.optimizer_options.") names its keys in errors."""
    merged = dataclasses.asdict(cls())
    merge_mapping(merged, data, prefix=prefix, free=set())
    return _build(cls, merged, prefix=prefix)


def merge_mapping(dst: dict[str, Any], src: dict[str, Any], prefix: str = "",
                  free: set[str] | None = None) -> None:
    """Update the nested mapping `dst` from `src`, rejecting keys `dst` does not have.

    Keys in `free` (by default the `dict` fields of `Config`, e.g. task.options) are mappings of
    the user's own keys: their entries are merged in unchecked.
    """
    free = _FREE_MAPPINGS if free is None else free
    for key, value in src.items():
        name = f"{prefix}{key}"
        if key not in dst:
            known = ", ".join(sorted(dst))
            raise EssaError(f"unknown config key '{name}' (known at this level: {known})")
        if name in free and isinstance(value, dict) and isinstance(dst[key], dict):
            dst[key] = {**dst[key], **value}
        elif isinstance(dst[key], dict) and name not in free:
            if not isinstance(value, dict):
                raise EssaError(f"config key '{name}' is a section; give its keys, e.g. {name}.KEY=VALUE")
            merge_mapping(dst[key], value, prefix=f"{name}.", free=free)
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


def _free_mapping_names(cls: type, prefix: str = "") -> set[str]:
    """Dotted names of the `dict` fields of a config dataclass and its sections."""
    names: set[str] = set()
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            names |= _free_mapping_names(tp, f"{prefix}{name}.")
        elif typing.get_origin(tp) is dict:
            names.add(f"{prefix}{name}")
    return names


_FREE_MAPPINGS = _free_mapping_names(Config)


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
        for option in inner[:-1]:  # the first type the value fits, e.g. `float | str` for 0.3 or "auto"
            try:
                return _coerce(option, value, name)
            except EssaError:
                pass
        return _coerce(inner[-1], value, name)
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
    if tp is float and isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 3e-5 (an exponent without a dot) as a string
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
