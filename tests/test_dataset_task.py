"""The `dataset` task: rows with a prompt column and TRL-style reward functions, as GRPOTrainer reads them."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from essa.cli import main
from essa.config import TaskConfig
from essa.errors import EssaError
from essa.tasks import format_prompt, get_task
from essa.tasks.dataset import DatasetTask, dataset_rows, reward_name
from helpers import make_tiny_model_dir, tiny_tokenizer
from task_helpers import write_jsonl
from test_reward_model_task import save_reward_model

torch.set_num_threads(1)

ROWS = [{"prompt": f"What is {i} plus 1?", "answer": str(i + 1), "completion": str(i + 1), "level": i % 3}
        for i in range(12)]


def exact(completions, answer, **kwargs):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def only_level_zero(completions, level):
    return [0.5 if lv == 0 else None for lv in level]


def test_plain_prompts_are_fed_as_text_and_rewards_get_columns_by_name():
    seen = {}

    def spy(prompts, completions, answer, **kwargs):
        seen.update(kwargs, prompts=prompts, completions=completions, answer=answer)
        return [0.0] * len(completions)

    task = DatasetTask({"train": ROWS}, [spy], validation_size=4, seed=0)
    tok = tiny_tokenizer()
    example = task.split("train")[0]
    assert format_prompt(tok, task, example) == example.prompt  # no chat template, as TRL does
    task.reward_batch(["7", "x"], task.split("train")[:2])
    assert seen["prompts"] == [e.prompt for e in task.split("train")[:2]]
    assert seen["completions"] == ["7", "x"]  # plain prompts: plain completions
    assert seen["answer"] == [e.answer["answer"] for e in task.split("train")[:2]]
    assert seen["level"] == [e.answer["level"] for e in task.split("train")[:2]]
    assert seen["trainer_state"] is None and callable(seen["log_metric"]) and callable(seen["log_extra"])
    assert len(seen["completion_ids"]) == 2  # the tokenizer is known once prompts were formatted
    assert "completion" not in seen and "prompt" not in seen  # as TRL: never passed on


def test_conversational_prompts_use_the_chat_template_and_get_message_completions():
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}"}],
             "answer": str(i)} for i in range(6)]
    got = {}

    def spy(completions, prompts, **kwargs):
        got.update(completions=completions, prompts=prompts)
        return [1.0 for _ in completions]

    task = DatasetTask({"train": rows, "validation": rows[:1]}, [spy])
    tok = tiny_tokenizer()
    example = task.split("train")[1]
    text = format_prompt(tok, task, example)
    assert text == tok.apply_chat_template(rows[1]["prompt"], tokenize=False, add_generation_prompt=True)
    assert task.reward_batch(["hi"], [example]) == [1.0]
    assert got["completions"] == [[{"role": "assistant", "content": "hi"}]]
    assert got["prompts"] == [rows[1]["prompt"]]


def test_weighted_sum_and_none_for_not_applicable():
    task = DatasetTask({"train": ROWS}, [exact, only_level_zero], reward_weights=[1.0, 2.0], validation_size=2)
    examples = task.split("train")[:6]
    completions = [e.answer["answer"] if i % 2 == 0 else "wrong" for i, e in enumerate(examples)]
    rewards = task.reward_batch(completions, examples)
    for i, (e, r) in enumerate(zip(examples, rewards)):
        expected = (1.0 if i % 2 == 0 else 0.0) + (1.0 if e.answer["level"] == 0 else 0.0)
        assert r == pytest.approx(expected)
    # A completion no function applies to scores 0 (not NaN, not a failure).
    task = DatasetTask({"train": ROWS}, [only_level_zero], validation_size=2)
    level_one = [e for e in task.split("train") if e.answer["level"] == 1][:1]
    assert task.reward_batch(["x"], level_one) == [0.0]


def test_validation_is_held_out_of_train_seeded_and_disjoint():
    a = DatasetTask({"train": ROWS}, [exact], validation_size=3, seed=1)
    b = DatasetTask({"train": ROWS}, [exact], validation_size=3, seed=1)
    c = DatasetTask({"train": ROWS}, [exact], validation_size=3, seed=2)
    val = [e.prompt for e in a.split("validation")]
    train = [e.prompt for e in a.split("train")]
    assert len(val) == 3 and len(train) == 9 and not set(val) & set(train)
    assert val == [e.prompt for e in b.split("validation")]
    assert val != [e.prompt for e in c.split("validation")]
    assert train == [r["prompt"] for r in ROWS if r["prompt"] not in val]  # order kept
    assert [e.target for e in a.split("sft")] == [e.target for e in a.split("train")]  # completion column
    with pytest.raises(EssaError, match="too few to hold out"):
        DatasetTask({"train": ROWS[:3]}, [exact], validation_size=3)


@pytest.mark.parametrize("func, message", [
    (lambda x: [0.0], "needs an argument 'x'"),
    (lambda prompts: [0.0], "takes no 'completions'"),
    (lambda completions, **kw: [1.0], "returned 1 values for 2 completions"),
    (lambda completions, **kw: "1", "returned str"),
    (lambda completions, **kw: ["good"] * len(completions), "rewards must be numbers"),
    (lambda completions, **kw: 1 / 0, "failed on a trial call"),
    (42, "neither a callable nor a reward model"),
])
def test_bad_reward_functions_are_refused_before_anything_runs(func, message):
    with pytest.raises(EssaError, match=message):
        DatasetTask({"train": ROWS}, [func], validation_size=2).check_rewards()


def test_reward_weights_must_match_the_functions():
    with pytest.raises(EssaError, match="2 weights for 1 reward functions"):
        DatasetTask({"train": ROWS}, [exact], reward_weights=[1, 2], validation_size=2)


def test_dataset_rows_accepts_datasets_and_lists_and_names_what_is_wrong():
    ds = datasets.Dataset.from_list(ROWS)
    assert dataset_rows(ds, "train_dataset") == ROWS
    assert dataset_rows(ROWS, "train_dataset") == ROWS
    with pytest.raises(EssaError, match="no 'prompt' column"):
        dataset_rows(datasets.Dataset.from_list([{"question": "q"}]), "train_dataset")
    with pytest.raises(EssaError, match="row 1 has no 'prompt'"):
        dataset_rows([{"prompt": "a"}, {"question": "q"}], "train_dataset")
    with pytest.raises(EssaError, match="IterableDataset"):
        dataset_rows(ds.to_iterable_dataset(), "train_dataset")
    with pytest.raises(EssaError, match="list of chat messages"):
        dataset_rows([{"prompt": [{"text": "no role"}]}], "train_dataset")


def test_async_reward_functions_are_awaited():
    async def later(completions, **kwargs):
        return [float(len(c)) for c in completions]

    task = DatasetTask({"train": ROWS}, [later], validation_size=2)
    assert task.reward_batch(["ab", "c"], task.split("train")[:2]) == [2.0, 1.0]


def test_reward_model_as_reward_function_plain_and_conversational(tmp_path):
    from essa.tasks.reward_model import RewardScorer

    rm = save_reward_model(tmp_path / "rm")
    scorer = RewardScorer(rm)
    plain = DatasetTask({"train": ROWS}, [rm], validation_size=2)
    examples = plain.split("train")[:2]
    assert plain.reward_batch(["yes", "no"], examples) == pytest.approx(
        scorer.score_batch([e.prompt for e in examples], ["yes", "no"]))
    chat = [{"prompt": [{"role": "user", "content": f"Q{i}"}]} for i in range(4)]
    task = DatasetTask({"train": chat, "validation": chat[:1]}, [rm])
    got = task.reward_batch(["a", "b"], task.split("train")[:2])
    want = scorer.score_conversations([[{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": c}]
                                       for i, c in ((0, "a"), (1, "b"))])
    assert got == pytest.approx(want) and got[0] != got[1]
    assert reward_name(rm) == rm


def test_dataset_task_from_config_options(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    funcs = tmp_path / "rewards.py"
    funcs.write_text("def exact(completions, answer, **kw):\n"
                     "    return [float(c == a) for c, a in zip(completions, answer)]\n")
    task = get_task(TaskConfig(name="dataset", validation_size=2, options={
        "train": str(data), "reward_funcs": [f"{funcs}:exact"], "reward_weights": [2.0]}))
    assert len(task.split("train")) == 10 and len(task.split("validation")) == 2
    ex = task.split("train")[0]
    assert task.reward_batch([ex.answer["answer"]], [ex]) == [2.0]
    with pytest.raises(EssaError, match="unknown config key 'task.options.trian'"):
        get_task(TaskConfig(name="dataset", options={"trian": str(data), "reward_funcs": ["x:y"]}))
    with pytest.raises(EssaError, match="written by essa.ESSATrainer"):
        get_task(TaskConfig(name="dataset", options={"source": "python", "reward_funcs": ["x"]}))
    with pytest.raises(EssaError, match="has no function 'missing'"):
        get_task(TaskConfig(name="dataset", options={"train": str(data), "reward_funcs": [f"{funcs}:missing"]}))
    with pytest.raises(EssaError, match="has no 'prompt' field"):
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
        get_task(TaskConfig(name="dataset", options={"test": str(bad), "reward_funcs": [f"{funcs}:exact"]}))


def test_essa_eval_scores_a_dataset_file_with_a_reward_function(capsys, tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": f"Say {i}", "answer": str(i)} for i in range(5)])
    funcs = tmp_path / "rewards.py"
    funcs.write_text("def has_digit(completions, **kwargs):\n"
                     "    return [1.0 if any(ch.isdigit() for ch in c) else 0.0 for c in completions]\n"
                     "def length(completions, **kwargs):\n    return [len(c) / 100 for c in completions]\n")
    records = tmp_path / "records.jsonl"
    code = main(["eval", f"model.name={model_dir}", "decoding.max_new_tokens=5", "--dataset", str(data),
                 "--reward-func", f"{funcs}:has_digit", "--reward-func", f"{funcs}:length",
                 "task.options.reward_weights=[1.0, 0.5]", "--records", str(records), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["task"] == "dataset" and metrics["examples"] == 5
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    for line in lines:
        want = float(any(ch.isdigit() for ch in line["completion"])) + 0.5 * len(line["completion"]) / 100
        assert line["reward"] == pytest.approx(want)
        assert line["prompt"].startswith("Say ")
    assert metrics["mean_reward"] == pytest.approx(np.mean([line["reward"] for line in lines]))

    code = main(["eval", f"model.name={model_dir}", "--dataset", str(data), "--quiet"])
    assert code == 2 and "go together" in capsys.readouterr().err
