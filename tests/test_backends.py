"""The backend seam: one registry builds every backend, and a new one is its class plus one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from adapters import make_random_adapter
from helpers import make_tiny_model_dir, tiny_llama, tiny_tokenizer

import essa.backends as backends
from essa.backends import Backend, Minibatch, build_backend, evaluation_kind, load_inputs
from essa.backends.local import LocalBackend
from essa.backends.vllm_backend import sampling_options
from essa.commands import run_eval, run_train
from essa.compare import RecordingBackend
from essa.config import Config, DecodingConfig, SearchConfig, load_config
from essa.errors import EssaError
from essa.evaluate import score
from essa.models import before_eos, eos_token_ids, source_generation_config
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


# --- stop tokens --------------------------------------------------------------------------


def test_eos_token_ids_join_the_generation_configs_and_the_tokenizers():
    tok = tiny_tokenizer()  # EOS <|im_end|>
    end = tok.eos_token_id
    assert eos_token_ids(tok) == (end,)
    assert eos_token_ids(tok, transformers.GenerationConfig(eos_token_id=7)) == (7, end)
    assert eos_token_ids(tok, transformers.GenerationConfig(eos_token_id=[7, end, 9])) == (7, end, 9)
    assert eos_token_ids(tok, transformers.GenerationConfig()) == (end,)
    assert before_eos([5, 6, 7, 8, 7], {7, 9}) == [5, 6] and before_eos([5, 6], {7}) == [5, 6]


def test_an_engine_that_loads_the_model_itself_stops_on_the_saved_generation_configs_eos_ids(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    tok = tiny_tokenizer()
    newline = tok.convert_tokens_to_ids("\n")
    config = transformers.GenerationConfig.from_pretrained(model_dir)
    config.eos_token_id = [newline, tok.eos_token_id]
    config.save_pretrained(model_dir)
    stop = eos_token_ids(tok, source_generation_config(str(model_dir)))
    assert stop == (newline, tok.eos_token_id)
    assert source_generation_config(str(tmp_path / "nothing-here")) is None
    # What the vLLM backend passes to SamplingParams for every row.
    options = sampling_options(DecodingConfig(max_new_tokens=5), seed=3, stop_token_ids=list(stop))
    assert options["stop_token_ids"] == [newline, tok.eos_token_id] and options["seed"] is None


@pytest.mark.parametrize("engine", ["essa", "generate"])
def test_local_engines_stop_on_every_eos_id_of_the_models_generation_config(engine):
    # A chat model whose turn ends with a token other than the tokenizer's EOS: here ")", which the
    # tiny random model writes often (and which is no special token, so it would show in the text).
    model, tok = tiny_llama(), tiny_tokenizer()
    end_of_turn = tok.convert_tokens_to_ids(")")
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ["hi", "what is 2+2?", "tell me a story about a cat", "a", "list three colours", "why?"]]

    def completions():
        backend = LocalBackend(model, tok, None, DecodingConfig(max_new_tokens=24, batch_size=4, engine=engine))
        try:
            return backend.evaluate(None, prompts)[0]
        finally:
            backend.close()

    free = completions()
    model.generation_config.eos_token_id = [end_of_turn, tok.eos_token_id]
    stopped = completions()
    assert sum(")" in text for text in free) >= 3  # stopping on <|im_end|> alone runs past it
    assert stopped == [text.split(")")[0] for text in free]
