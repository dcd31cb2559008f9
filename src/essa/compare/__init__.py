"""`essa compare`: ESSA vs GRPO from the same SFT adapter, same reward, same prompts, same budget.

Protocol (what makes the comparison fair, and what the report claims):
- One start adapter: the SFT adapter (trained once, or `adapter=PATH`), or with
  `compare.svd_vectors: random` the same adapter with random orthonormal singular vectors and the
  same singular values (the paper's Appendix E ablation). Both methods save the exact tensors they
  start from (`essa/start_adapter`, `grpo/lr_<lr>/start_adapter`); the run fails unless they are
  equal.
- One prompt stream (`essa.schedule.prompt_stream`): ESSA's mini-batches over the task's train
  split. GRPO reads the same stream in the same order, cut into its steps; each method records
  what it read and the run fails unless both read exactly the stream.
- One clock per method, counting training work only: ESSA generations (its validation passes are
  kept off the trainer's search clock), GRPO optimizer steps (snapshot
  saves are off the clock). Each stops at the first step that ends past `compare.budget_s`.
- Matched checkpoints: at every budget/`checkpoints` seconds each method snapshots its current
  model (ESSA: the optimizer mean, no validation involved; GRPO: the current adapter). ESSA trains
  on the configured backend (backend.kind). After training, every snapshot is evaluated greedily
  by the same evaluator (the backend that evaluates single adapters for this config: local or
  vLLM, the workers' engine for a Ray pool) on the validation and the held-out test split.
  Selection ("validation-best") reads validation accuracy only; the test split is only reported.
  Each snapshot's per-example 0/1 scores are kept (`scores.npz` beside each `result.json`), and
  the summary compares snapshots problem by problem on the test split (`essa.stats`: delta,
  paired bootstrap 95% CI, McNemar's exact p).
- A fair baseline: with `grpo.lr_sweep` GRPO runs once per learning rate, each with the full
  budget, from the same start and prompt stream (each checked as above), in `grpo/lr_<lr>/`. The
  run compared with ESSA is the one whose final snapshot has the highest validation accuracy;
  every run's numbers are reported.
- One precision: GRPO trains with bf16 autocast (rollouts included) exactly when the model's
  inference dtype, the one ESSA searches in, is bf16; every snapshot of both methods is evaluated
  in that inference dtype. The summary records each method's precision.
- Peak memory: with `compare.isolate` (default) SFT, ESSA and GRPO each run in a fresh process
  started with multiprocessing 'spawn'; each reports its own `ru_maxrss` right after training
  (model load + training; evaluation comes later), so the two peaks are separable. GRPO's
  snapshots are scored in another fresh process, on a freshly loaded model: in the process that
  trained, greedy decoding ran 2.5x slower (1.6x after `malloc_trim`; the rest not pinned down).
- Resume (`--resume`): finished jobs (SFT, ESSA, each GRPO run's training and its scoring) are
  kept, an interrupted one starts over; only with the settings the comparison began with.

- The common-sense arm (`compare.sft_arm: true`): the start adapter's LoRA SFT continued
  (`essa.sft.continue_sft`: the SFT loss on the task's sft split, sft.lr constant, sft.batch_size)
  for the same budget, snapshotted at the same times and scored by the same evaluator, in
  `sft_arm/`. It saves its start tensors too (checked equal to ESSA's); it reads the sft split,
  not the prompt stream. The summary adds its row and paired tests (its final and
  validation-best vs the start, ESSA's final vs its final). A task whose sft split lacks targets
  is refused before anything is written.

With `grpo.svd_only: true` the baseline is SVD-GRPO: the same GRPO, but only the singular-value
offsets ESSA searches are trained (`svd_grpo.py`); tables and plots then name it SVD-GRPO.

Modules, one job each: `orchestration` (settings, the jobs in order, spawn, --resume), `jobs` (SFT,
ESSA, GRPO and continued-SFT training and scoring, each a process), `fairness` (the shared start and prompt stream),
`results` (the typed records and their JSON files), `summary` (selection and statistics), `report`
(tables, report.md, plots).
"""

from essa.compare.fairness import check_same_prompts, check_same_start, randomize_singular_vectors, same_adapter_tensors
from essa.compare.jobs import RecordingBackend
from essa.compare.orchestration import compare_defaults, grpo_run_dir, load_compare_config, run_compare
from essa.compare.results import (
    CompareSummary,
    EssaResult,
    GrpoResult,
    Point,
    SftArmResult,
    load_result,
    load_scores,
    write_result,
)
from essa.compare.summary import paired_test, select_grpo_run, time_to_target, validation_best

__all__ = [
    "CompareSummary",
    "EssaResult",
    "GrpoResult",
    "Point",
    "RecordingBackend",
    "SftArmResult",
    "check_same_prompts",
    "check_same_start",
    "compare_defaults",
    "grpo_run_dir",
    "load_compare_config",
    "load_result",
    "load_scores",
    "paired_test",
    "randomize_singular_vectors",
    "run_compare",
    "same_adapter_tensors",
    "select_grpo_run",
    "time_to_target",
    "validation_best",
    "write_result",
]
