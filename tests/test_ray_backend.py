"""The Ray population backend: same fitness as the local backend, survives a dying worker,
and ships O(popsize) bytes per generation whatever the model size."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from adapters import make_random_adapter
from helpers import tiny_llama, tiny_tokenizer

from essa.backends.local import LocalBackend
from essa.config import BackendConfig, Config, DecodingConfig, ModelConfig, SearchConfig, TaskConfig
from essa.errors import EssaError
from essa.evaluate import score
from essa.optim import make_optimizer
from essa.svd_space import SvdLoraSpace
from essa.tasks import format_prompt, get_task
from essa.trainer import EssaTrainer

ray = pytest.importorskip("ray")
from essa.backends.ray_backend import RayPopulationEvaluator

pytestmark = pytest.mark.ray
torch.set_num_threads(1)

TASK_FILE = Path(__file__).with_name("ray_tasks.py")
# Every singular value its own coordinate: the local reference builds its space with from_adapter's
# defaults, and the workers theirs from this config.
SEARCH = SearchConfig(optimizer="sep-cma", popsize=4, sigma0=0.5, prompts_per_generation=3, generations=2,
                      eval_every=2, seed=7, share=[])
# Sampled: fitness must not depend on how candidates are split across workers or batched.
DECODING = DecodingConfig(max_new_tokens=6, batch_size=32, temperature=1.0)
GENERATIONS = 3


def task_config(**options) -> TaskConfig:
    return TaskConfig(name=f"{TASK_FILE}:make_vowel_task", options=options)


def prompt_indices(gen: int) -> list[int]:
    return [int(i) for i in np.random.default_rng([SEARCH.seed, gen]).choice(6, size=3, replace=False)]


def save_model(path: Path, **size) -> Path:
    tiny_llama(seed=0, **size).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Logical CPUs: tests run several tiny evaluators side by side on two cores.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    model_dir = save_model(root / "model")
    adapter = make_random_adapter(tiny_llama(seed=0), root / "adapter", rank=2)
    return model_dir, adapter, root


def make_evaluator(model_dir, adapter, task: TaskConfig, messages: list[str] | None = None,
                   **backend) -> RayPopulationEvaluator:
    return RayPopulationEvaluator(ray_config(model_dir, task, **backend), str(adapter), 1.0, cpus_per_worker=0.5,
                                  log=messages.append if messages is not None else None)


def ray_config(model_dir, task: TaskConfig, **backend) -> Config:
    return Config(model=ModelConfig(name=str(model_dir)), task=task, decoding=DECODING, essa=SEARCH,
                  backend=BackendConfig(kind="ray", **{"workers": 2, **backend}))


@pytest.fixture(scope="module")
def evaluator(ray_session, files):
    model_dir, adapter, _ = files
    ev = make_evaluator(model_dir, adapter, task_config())
    yield ev
    ev.close()


@pytest.fixture(scope="module")
def local_history(files):
    """The reference: the plain ask -> LocalBackend.evaluate -> score -> tell loop in this process."""
    _, adapter, _ = files
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    space = SvdLoraSpace.from_adapter(adapter, 1.0, model=model)
    backend = LocalBackend(model, tok, space, DECODING)
    task = get_task(task_config())
    train = task.checked_split("train")
    opt = make_optimizer(SEARCH, space.dim)
    history = []
    for gen in range(GENERATIONS):
        population = opt.ask()
        examples = [train[i] for i in prompt_indices(gen)]
        completions = backend.evaluate(population, [format_prompt(tok, task, ex) for ex in examples], seed=gen)
        fitness = score(task, completions, examples).mean(axis=1)
        opt.tell(population, fitness)
        history.append((population, fitness))
    return history


def run_ray(ev: RayPopulationEvaluator, dim: int, before=None) -> tuple[list, list[int]]:
    opt = make_optimizer(SEARCH, dim)
    history, sent = [], []
    for gen in range(GENERATIONS):
        if before is not None:
            before(gen)
        population, fitness, _ = ev.run_indices(gen, opt, prompt_indices(gen), seed=gen)
        opt.tell(population, fitness)
        history.append((population, fitness))
        sent.append(ev.bytes_sent_last_generation)
    return history, sent


def assert_same_history(got, want):
    assert len(got) == len(want)
    for (pop_g, fit_g), (pop_w, fit_w) in zip(got, want):
        np.testing.assert_array_equal(pop_g, pop_w)
        np.testing.assert_array_equal(fit_g, fit_w)


def test_two_workers_match_local_backend_and_resync_after_resume(evaluator, local_history):
    history, _ = run_ray(evaluator, evaluator.dim)
    assert_same_history(history, local_history)
    # Candidates got different rewards, so the equality above is not vacuous.
    assert any(np.ptp(fitness) > 0 for _, fitness in local_history)

    # A resumed driver (a new optimizer object, restored from a checkpoint) is adopted once.
    opt = make_optimizer(SEARCH, evaluator.dim)
    for gen in range(2):
        opt.tell(*evaluator.run_indices(gen, opt, prompt_indices(gen), seed=gen)[:2])
    resumed = make_optimizer(SEARCH, evaluator.dim)
    resumed.load_state_dict(opt.state_dict())
    population, fitness, halves = evaluator.run_indices(2, resumed, prompt_indices(2), seed=2)
    np.testing.assert_array_equal(population, local_history[2][0])
    np.testing.assert_array_equal(fitness, local_history[2][1])
    # The workers' half-fitness (for the split-half signal figure): 3 prompts split 1 + 2.
    np.testing.assert_allclose((halves[:, 0] + 2 * halves[:, 1]) / 3, fitness)


def test_driver_out_of_sync_is_detected(evaluator):
    opt = make_optimizer(SEARCH, evaluator.dim)
    population, fitness, _ = evaluator.run_indices(0, opt, prompt_indices(0))
    opt.tell(population + 1.0, fitness)  # not what the workers will apply
    with pytest.raises(EssaError, match="out of sync"):
        evaluator.run_indices(1, opt, prompt_indices(1))
    wrong = make_optimizer(dataclasses.replace(SEARCH, popsize=SEARCH.popsize + 2), evaluator.dim)
    with pytest.raises(EssaError, match="popsize"):
        evaluator.run_indices(0, wrong, prompt_indices(0))


def test_worker_dying_mid_generation_is_replaced_and_fitness_unchanged(ray_session, files, local_history):
    model_dir, adapter, root = files
    marker = root / "die-once"
    messages: list[str] = []
    ev = make_evaluator(model_dir, adapter, task_config(die_once_file=str(marker)), messages)
    try:
        first_pids = {ray.get(ev.actor(i).info.remote())["pid"] for i in range(2)}

        def arm(gen):
            if gen == 2:  # the first worker to score a completion in generation 2 exits
                marker.touch()

        history, _ = run_ray(ev, ev.dim, before=arm)
        assert not marker.exists()
        assert ev.replacements == 1
        assert any("lost" in m and "generation 2" in m and "replays 2 generation" in m for m in messages)
        pids = {ray.get(ev.actor(i).info.remote())["pid"] for i in range(2)}
        assert len(pids & first_pids) == 1
        assert_same_history(history, local_history)

        # Killed between generations, after a resync to a new driver: the replacement starts
        # from the shipped driver state instead of replaying from scratch.
        ray.kill(ev.actor(0))
        opt = make_optimizer(SEARCH, ev.dim)
        for gen in range(2):
            population, fitness, _ = ev.run_indices(gen, opt, prompt_indices(gen), seed=gen)
            opt.tell(population, fitness)
            np.testing.assert_array_equal(fitness, local_history[gen][1])
        assert ev.replacements == 2
    finally:
        ev.close()


def test_worker_hanging_mid_generation_is_replaced_and_fitness_unchanged(ray_session, files, local_history):
    """A worker that stays alive but never answers (ray.wait alone would block forever) is
    detected by backend.chunk_timeout_s, replaced, and its chunk re-queued."""
    model_dir, adapter, root = files
    marker = root / "hang-once"
    messages: list[str] = []
    # Far above a tiny chunk's time even on a loaded machine; the test waits this long once.
    ev = make_evaluator(model_dir, adapter, task_config(hang_once_file=str(marker)), messages, chunk_timeout_s=10)
    try:
        def arm(gen):
            if gen == 1:  # the first worker to score a completion in generation 1 hangs
                marker.touch()

        history, _ = run_ray(ev, ev.dim, before=arm)
        assert not marker.exists()
        assert ev.replacements == 1
        assert any("generation 1" in m and "hung" in m and "backend.chunk_timeout_s=10" in m for m in messages)
        assert_same_history(history, local_history)
    finally:
        ev.close()


def test_bytes_per_generation_do_not_grow_with_the_model(evaluator, files):
    root = files[2]
    big_dir = save_model(root / "big-model", hidden_size=64, num_layers=4, intermediate=128)
    big_adapter = make_random_adapter(tiny_llama(seed=0, hidden_size=64, num_layers=4, intermediate=128),
                                      root / "big-adapter", rank=8)
    big = make_evaluator(big_dir, big_adapter, task_config())
    try:
        assert big.dim > 4 * evaluator.dim
        _, small_sent = run_ray(evaluator, evaluator.dim)
        _, big_sent = run_ray(big, big.dim)
    finally:
        big.close()
    # After generation 0 the payload is the same few scalars whatever the model or search space.
    assert small_sent[1:] == big_sent[1:]
    assert max(big_sent) < 4096
    # Shipping the candidates alone would cost more than the whole protocol does.
    assert max(big_sent) < SEARCH.popsize * big.dim * 8


@pytest.mark.parametrize("sigma0", [0.5, "auto"])
def test_trainer_on_ray_matches_the_local_backend_including_validation(ray_session, files, tmp_path, sigma0):
    """The trainer drives the Ray backend (workers regenerate candidates, validation ships rows) and
    matches the local backend: fitness, validation accuracies that differ, the final adapter. With
    sigma0 "auto" only the driver knows the probed step; the workers start from it too."""
    model_dir, adapter, _ = files
    task_cfg = task_config(any_vowel=True, validation_examples=16)
    task = get_task(task_cfg)
    # With "auto", also essa.mean_step: signal, whose per-generation mean rate the workers apply too.
    search = dataclasses.replace(SEARCH, sigma0=sigma0, mean_step="signal" if sigma0 == "auto" else "full")
    evaluator = RayPopulationEvaluator(Config(model=ModelConfig(name=str(model_dir)), task=task_cfg,
                                              decoding=DECODING, essa=search,
                                              backend=BackendConfig(kind="ray", workers=2)),
                                       str(adapter), 1.0, cpus_per_worker=0.5)
    try:
        ray_run = EssaTrainer(evaluator, tiny_tokenizer(), task, search, tmp_path / "ray", progress=False).run()
    finally:
        evaluator.close()
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    space = SvdLoraSpace.from_adapter(adapter, 1.0, model=model)
    local = LocalBackend(model, tok, space, DECODING)
    local_run = EssaTrainer(local, tok, task, search, tmp_path / "local", progress=False).run()
    assert ray_run.state.sigma0 == local_run.state.sigma0
    if sigma0 == "auto":
        assert "probe" in json.loads((tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()[0])

    def metrics(run_dir):  # everything but the timings
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")} for line in lines]

    assert metrics(tmp_path / "ray") == metrics(tmp_path / "local")
    if sigma0 == "auto":  # the mean rates, which the workers applied too, were not all 1
        rates = [r["mean_rate"] for r in metrics(tmp_path / "local") if "mean_rate" in r]
        assert any(rate < 1.0 for rate in rates), rates
    assert ray_run.validation == local_run.validation
    np.testing.assert_array_equal(ray_run.final_z, local_run.final_z)
    # The equalities above are not all-zero ones: candidates' fitness differed, and with the fixed
    # step (the probe's step is smaller) validation accuracies differ along the run too.
    assert any(r["fitness_max"] > r["fitness_min"] for r in metrics(tmp_path / "local") if "fitness_max" in r)
    if sigma0 != "auto":
        accuracies = [r["val_accuracy"] for r in metrics(tmp_path / "local") if "val_accuracy" in r]
        accuracies += list(local_run.validation.values())
        assert len(set(accuracies)) > 1 and max(accuracies) > 0, accuracies


def test_a_worker_regenerates_what_the_trainers_optimizer_asks(files, tmp_path, monkeypatch):
    """The lock-step contract (essa.optim): a worker builds its optimizer copy as the trainer
    builds the driver's, from the essa settings, the dimension and the driver's step size. A
    change to how the trainer starts its optimizer that the workers do not follow fails here."""
    from essa.backends.ray_backend import ChunkJob, PopulationWorker

    model_dir, adapter, _ = files
    task_cfg = task_config()
    search = dataclasses.replace(SEARCH, sigma0="auto", popsize=6, generations=1)
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    local = LocalBackend(model, tok, SvdLoraSpace.from_adapter(adapter, 1.0, model=model), DECODING)
    asked = []
    run_generation = local.run_generation

    def recording(*args):
        result = run_generation(*args)
        asked.append(result.population.copy())
        return result

    monkeypatch.setattr(local, "run_generation", recording)
    trainer = EssaTrainer(local, tok, get_task(task_cfg), search, tmp_path / "run", progress=False)
    trainer.run()
    driver_sigma0 = trainer.optimizer.sigma0
    assert driver_sigma0 != SEARCH.sigma0  # the probe chose it
    worker = PopulationWorker(ray_config(model_dir, task_cfg).with_changes(essa=search), str(adapter), 1.0)
    worker.run_chunk(ChunkJob(0, range(0, 6), [0, 1, 2], seed=0, updates=[], sigma0=driver_sigma0))
    np.testing.assert_array_equal(worker.population, asked[0])
