"""Reward-model task: a tiny random reward model saved to disk scores prompt/completion pairs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from essa.config import TaskConfig
from essa.errors import EssaError
from essa.tasks import SPLITS, Example, get_task
from essa.tasks.reward_model import HelpSteer2Task, RewardModelTask, format_pair
from helpers import PAD_ID, TINY_VOCAB_SIZE, tiny_tokenizer

torch.set_num_threads(1)

PROMPTS = [{"prompt": f"Question number {i}: what is {i} plus {i}?"} for i in range(14)]
for i in range(0, 14, 2):
    PROMPTS[i]["response"] = f"It is {2 * i}."
COMPLETIONS = ["Sure.", "The answer is four, because two and two make four.", "", "No idea at all",
               "x" * 70, "Paris is the capital of France.", "ok"]


def save_reward_model(path, num_labels: int = 1, seed: int = 0, chat_template: bool = True):
    config = LlamaConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=PAD_ID, bos_token_id=None,
                         num_labels=num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
        # A random head is near zero; scale it so scores differ clearly between inputs.
        model.score.weight.data.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tokenizer = tiny_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_reward_model(tmp_path_factory.mktemp("rm"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return str(path)


SIZES = dict(sft_size=3, train_size=4, validation_size=3, test_size=3)


def make_task(model_dir, prompts_file, sizes=None, **options) -> RewardModelTask:
    opts = {"reward_model": model_dir, "prompts_file": prompts_file, **options}
    return RewardModelTask(TaskConfig(name="reward_model", options=opts, **(sizes or SIZES)))


def test_batched_scores_equal_one_by_one(model_dir, prompts_file):
    task = make_task(model_dir, prompts_file, reward_batch_size=3)
    examples = (task.split("train") * 2)[:len(COMPLETIONS)]
    batched = task.reward_batch(COMPLETIONS, examples)
    single = [task.reward(c, e) for c, e in zip(COMPLETIONS, examples)]
    assert len(batched) == len(COMPLETIONS)
    assert batched == pytest.approx(single, abs=1e-5)
    raw = task.scorer.score_batch([e.prompt for e in examples], COMPLETIONS)
    assert raw == pytest.approx(batched, abs=1e-6)  # no normalisation by default
    # Scores depend on the completion: a constant scorer would pass the checks above.
    assert max(batched) - min(batched) > 1e-3


def test_reward_is_deterministic_across_instances(model_dir, prompts_file):
    a, b = make_task(model_dir, prompts_file), make_task(model_dir, prompts_file)
    ex = a.split("validation")[0]
    first = a.reward("A fine answer.", ex)
    assert a.reward("A fine answer.", ex) == first
    assert b.reward("A fine answer.", ex) == pytest.approx(first, abs=1e-6)


def test_score_matches_a_direct_forward_pass(model_dir, prompts_file):
    task = make_task(model_dir, prompts_file)
    ex = task.split("test")[0]
    text = task.scorer.format_pair(ex.prompt, "Hello.")
    assert text.startswith("<|im_start|>user\n" + ex.prompt)
    assert "<|im_start|>assistant\nHello.<|im_end|>" in text
    tokenizer = tiny_tokenizer()
    model = LlamaForSequenceClassification.from_pretrained(model_dir).eval()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        expected = model(**ids).logits[0, 0].item()
    assert task.reward("Hello.", ex) == pytest.approx(expected, abs=1e-5)


def test_plain_text_without_chat_template(tmp_path, prompts_file):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    assert format_pair(tokenizer, "Why?", "Because.") == "Why?\n\nBecause."
    plain = save_reward_model(tmp_path / "plain", chat_template=False)
    task = make_task(plain, prompts_file, reward_batch_size=2)
    exs = task.split("train")[:3]
    comps = ["a", "bb bb", "ccc ccc ccc"]
    assert task.reward_batch(comps, exs) == pytest.approx(
        [task.reward(c, e) for c, e in zip(comps, exs)], abs=1e-5)


def test_label_index_picks_a_logit(tmp_path, prompts_file):
    two = save_reward_model(tmp_path / "two", num_labels=2)
    t0 = make_task(two, prompts_file, reward_label=0)
    t1 = make_task(two, prompts_file, reward_label=1)
    ex = t0.split("train")[0]
    assert t0.reward("Yes.", ex) != pytest.approx(t1.reward("Yes.", ex), abs=1e-4)
    with pytest.raises(EssaError, match="reward_label is 2 but .* has 2 output label"):
        make_task(two, prompts_file, reward_label=2).reward("Yes.", ex)


def test_normalisation(model_dir, prompts_file):
    raw_task = make_task(model_dir, prompts_file)
    norm = make_task(model_dir, prompts_file, reward_shift=0.5, reward_scale=2.0,
                     reward_sigmoid=True)
    ex = raw_task.split("train")[1]
    raw = raw_task.reward("Some answer.", ex)
    assert norm.reward("Some answer.", ex) == pytest.approx(
        1 / (1 + math.exp(-(raw - 0.5) / 2.0)), abs=1e-6)
    with pytest.raises(EssaError, match="reward_scale must not be 0"):
        make_task(model_dir, prompts_file, reward_scale=0)


def test_splits_are_disjoint_and_sft_has_targets(model_dir, prompts_file):
    task = make_task(model_dir, prompts_file)
    prompts = {s: [e.prompt for e in task.split(s)] for s in SPLITS}
    for s in SPLITS:
        assert len(prompts[s]) == SIZES[f"{s}_size"]
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not set(prompts[a]) & set(prompts[b])
    by_prompt = {r["prompt"]: r.get("response") for r in PROMPTS}
    for ex in task.split("sft"):
        assert ex.target is not None and task.sft_target(ex) == by_prompt[ex.prompt]
    other = RewardModelTask(TaskConfig(name="reward_model", seed=1, options={
        "reward_model": model_dir, "prompts_file": prompts_file}, **SIZES))
    assert [e.prompt for e in other.split("test")] != prompts["test"]


def test_small_source_gives_shorter_splits(model_dir, prompts_file, caplog):
    sizes = dict(sft_size=100, train_size=100, validation_size=2, test_size=2)
    task = make_task(model_dir, prompts_file, sizes=sizes)
    assert len(task.split("sft")) == 7 - sum(  # prompts with a response not held out
        1 for e in task.split("validation") + task.split("test") if e.target is not None)
    assert sum(len(task.split(s)) for s in SPLITS) == len(PROMPTS)
    assert "split 'sft' has" in caplog.text


def test_duplicate_prompts_keep_the_most_helpful_response(tmp_path, model_dir):
    rows = [{"prompt": "p", "response": "meh", "helpfulness": 1},
            {"prompt": "p", "response": "great", "helpfulness": 4},
            {"prompt": "q", "response": "fine", "helpfulness": 2}]
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = make_task(model_dir, str(path), sizes=dict(sft_size=2, train_size=0,
                                                      validation_size=0, test_size=0))
    assert {e.prompt: e.target for e in task.split("sft")} == {"p": "great", "q": "fine"}


def test_separate_eval_file(tmp_path, model_dir, prompts_file):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Eval {i}"}) + "\n" for i in range(6)))
    task = make_task(model_dir, prompts_file, eval_prompts_file=str(path))
    assert all(e.prompt.startswith("Eval") for e in task.split("validation") + task.split("test"))
    assert not any(e.prompt.startswith("Eval") for e in task.split("sft") + task.split("train"))


def test_missing_prompt_field_names_the_row(tmp_path, model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"question": "c"}\n')
    with pytest.raises(EssaError, match=r"bad\.jsonl: line 3 has no 'prompt' field"):
        make_task(model_dir, str(path))


def test_option_errors(model_dir, prompts_file, tmp_path):
    with pytest.raises(EssaError, match="needs task.options.reward_model"):
        RewardModelTask(TaskConfig(name="reward_model", options={"prompts_file": prompts_file}))
    with pytest.raises(EssaError, match="needs task.options.prompts_file"):
        RewardModelTask(TaskConfig(name="reward_model", options={"reward_model": model_dir}))
    with pytest.raises(EssaError, match="unknown option"):
        make_task(model_dir, prompts_file, reward_devic="cpu")
    with pytest.raises(EssaError, match="reward_batch_size"):
        make_task(model_dir, prompts_file, reward_batch_size=0)
    task = make_task(str(tmp_path / "no-model-here"), prompts_file)  # loads lazily
    with pytest.raises(EssaError, match="could not load reward model"):
        task.reward("x", task.split("train")[0])


def test_helpsteer2_defaults_to_the_hub_and_explains_offline(monkeypatch, model_dir):
    datasets = pytest.importorskip("datasets")
    asked = []

    def offline(name, split):
        asked.append((name, split))
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(EssaError, match="nvidia/HelpSteer2.*local"):
        HelpSteer2Task(TaskConfig(name="helpsteer2", options={"reward_model": model_dir}))
    assert asked == [("nvidia/HelpSteer2", "train")]


def test_task_loads_by_factory_path(model_dir, prompts_file):
    task = get_task(TaskConfig(name="essa.tasks.reward_model:RewardModelTask", options={
        "reward_model": model_dir, "prompts_file": prompts_file}, **SIZES))
    assert isinstance(task, RewardModelTask)
    assert task.messages(Example(prompt="hi")) == [{"role": "user", "content": "hi"}]
