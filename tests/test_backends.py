"""The backend seam: one registry builds every backend, and a new one is its class plus one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapters import make_random_adapter
from helpers import make_tiny_model_dir, tiny_llama, tiny_tokenizer

import essa.backends as backends
from essa.backends import Backend, Minibatch, build_backend, evaluation_kind, load_inputs
from essa.backends.local import LocalBackend
from essa.commands import run_eval, run_train
from essa.compare import RecordingBackend
from essa.config import Config, SearchConfig, load_config
from essa.errors import EssaError
from essa.evaluate import score
from essa.optim import make_optimizer
from essa.svd_space import SvdLoraSpace
from essa.tasks import Example, RewardStats, Task

torch.set_num_threads(1)

SMALL = ["task.train_size=8", "task.validation_size=3", "task.test_size=3", "decoding.max_new_tokens=4",
         "essa.popsize=4", "essa.prompts_per_generation=2", "essa.generations=2", "essa.eval_every=1"]


class CountingBackend(LocalBackend):
    """A new backend: the local runtime, counting the candidates it evaluates."""

    evaluated = 0

    def evaluate(self, population, prompts, seed=0, **offsets):
        CountingBackend.evaluated += 1 if population is None else len(population)
        return super().evaluate(population, prompts, seed=seed, **offsets)


@pytest.fixture()
def counting(monkeypatch):
    monkeypatch.setitem(backends._BACKENDS, "counting", CountingBackend)  # the one registry line
    CountingBackend.evaluated = 0
    return CountingBackend


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    return make_tiny_model_dir(root / "model"), make_random_adapter(tiny_llama(seed=0), root / "adapter", rank=2)


def test_a_registered_backend_runs_train_and_eval(counting, files, tmp_path):
    model_dir, adapter = files
    cfg = load_config(None, [*SMALL, f"model.name={model_dir}", f"adapter={adapter}", "backend.kind=counting",
                             f"output_dir={tmp_path / 'run'}"])
    summary = run_train(cfg, progress=False)
    # 2 generations x 4 candidates, plus validation of one candidate at a time.
    assert summary["generations"] == 2 and counting.evaluated >= 8
    before = counting.evaluated
    metrics = run_eval(cfg.with_changes(adapter=str(tmp_path / "run")), split="test")
    assert metrics["examples"] == 3 and counting.evaluated == before + 1


def test_unregistered_backend_is_a_config_error():
    with pytest.raises(EssaError, match="backend.kind must be one of local, vllm, ray"):
        load_config(None, ["backend.kind=counting"])


def test_a_ray_pool_evaluates_single_adapters_on_its_workers_engine():
    assert evaluation_kind(load_config(None, ["backend.kind=ray", "backend.worker_engine=local"])) == "local"
    assert evaluation_kind(load_config(None, ["backend.kind=vllm"])) == "vllm"
    assert evaluation_kind(Config()) == "local"


def test_default_run_generation_is_ask_evaluate_score(files):
    model_dir, adapter = files
    cfg = load_config(None, [*SMALL, f"model.name={model_dir}"])
    inputs = load_inputs(cfg, adapter, 1.0, loaded=(tiny_llama(seed=0), tiny_tokenizer()))
    backend = build_backend(cfg, inputs)
    task = VowelTask()
    examples = task.split("train")[:2]
    batch = Minibatch([0, 1], [e.prompt for e in examples], examples)
    search = SearchConfig(popsize=4, sigma0=0.5)
    try:
        got = backend.run_generation(0, make_optimizer(search, backend.dim), task, batch, seed=3, stats=RewardStats())
        population = make_optimizer(search, backend.dim).ask()
        fitness = score(task, backend.evaluate(population, batch.prompts, seed=3), examples).mean(axis=1)
    finally:
        backend.close()
    np.testing.assert_array_equal(got.population, population)
    np.testing.assert_array_equal(got.fitness, fitness)
    assert np.ptp(fitness) > 0  # candidates differ, so the equality is not vacuous


def test_recording_wrapper_declares_what_it_forwards(files):
    _, adapter = files
    space = SvdLoraSpace.from_adapter(adapter, 1.0)

    class Fixed(Backend):
        def evaluate(self, population, prompts, seed=0, candidate_offset=0, prompt_offset=0):
            return [["a" * (i + 1) for i in range(len(prompts))] for _ in range(len(population))]

    inner = Fixed()
    inner.space = space
    recorder = RecordingBackend(inner)
    assert recorder.dim == space.dim
    with pytest.raises(AttributeError):
        recorder.space_of_the_inner_backend  # noqa: B018 - no attribute discovery through the wrapper
    task = VowelTask()
    batch = Minibatch([3, 1], ["p", "q"], task.split("train")[:2])
    recorder.run_generation(0, make_optimizer(SearchConfig(popsize=2), space.dim), task, batch, 0, RewardStats())
    recorder.evaluate(np.zeros((1, space.dim)), ["validation prompt"])  # validation is not a generation
    assert recorder.batches == [[3, 1]]


class VowelTask(Task):
    name = "vowels"

    def split(self, name):
        return [Example(prompt=f"say {name} {i}") for i in range(6)]

    def reward(self, completion, example):
        return sum(c in "aeiou" for c in completion) / max(len(completion), 1)


def test_task_declares_batch_reward_and_extra_metrics_with_defaults():
    task = VowelTask()
    examples = task.split("test")[:2]
    assert task.reward_batch(["aa", "ab"], examples) == [1.0, 0.5]
    assert task.extra_metrics("aa", examples[0]) == {}
