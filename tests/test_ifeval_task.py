"""IFEval task: generator, SFT targets checked by the real if-verifiable checkers, rewards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import essa
from essa.config import TaskConfig
from essa.errors import EssaError
from essa.tasks import SPLITS, Example, get_task, safe_reward
from essa.tasks.ifeval import (
    GENERATOR_FAMILIES,
    HELDOUT_REQUESTS,
    SYSTEM_PROMPT,
    TRAIN_REQUESTS,
    IfevalItem,
    IfevalTask,
    conflicts,
    evaluate,
)

SMALL = dict(sft_size=400, train_size=150, validation_size=40, test_size=60)


def make_task(seed: int = 0, sizes: dict | None = None, **options) -> IfevalTask:
    return IfevalTask(TaskConfig(name="ifeval", seed=seed, options=options, **(sizes or SMALL)))


@pytest.fixture(scope="module")
def task() -> IfevalTask:
    return make_task(max_instructions=3)


def example(ids: list[str], kwargs: list[dict], prompt: str = "Write something.") -> Example:
    return Example(prompt=prompt, answer=IfevalItem.build("t", ids, kwargs))


# ---- generator --------------------------------------------------------------------------------

def test_split_sizes_and_system_prompt(task):
    for name, size in SMALL.items():
        examples = task.split(name.removesuffix("_size"))
        assert len(examples) == size
        assert len(set(examples)) == size  # examples stay hashable
    messages = task.messages(task.split("train")[0])
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert messages[1]["role"] == "user"


def test_splits_are_disjoint_and_held_out_requests_are_never_trained_on(task):
    prompts = {s: [e.prompt for e in task.split(s)] for s in SPLITS}
    for s in SPLITS:
        assert len(set(prompts[s])) == len(prompts[s])
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not set(prompts[a]) & set(prompts[b]), (a, b)
    trained = {e.meta["request"] for s in ("sft", "train") for e in task.split(s)}
    held = {e.meta["request"] for s in ("validation", "test") for e in task.split(s)}
    assert trained <= {r for r, _, _ in TRAIN_REQUESTS}
    assert held <= {r for r, _, _ in HELDOUT_REQUESTS}
    assert not trained & held


def test_request_banks_are_disjoint_and_usable():
    train = {r for r, _, _ in TRAIN_REQUESTS}
    held = {r for r, _, _ in HELDOUT_REQUESTS}
    assert len(train) == len(TRAIN_REQUESTS) >= 60 and len(held) == len(HELDOUT_REQUESTS) >= 50
    assert not train & held
    for request, _, answer in TRAIN_REQUESTS + HELDOUT_REQUESTS:
        # Every transform assumes three sentences and no commas (repeat_prompt + no_comma).
        assert "," not in request and "," not in answer and '"' not in answer
        assert answer.count(". ") + answer.count("? ") == 2, answer


def test_every_target_satisfies_its_instructions_with_the_real_checkers(task):
    seen = set()
    for split in SPLITS:
        for ex in task.split(split):
            scores = evaluate(ex.target, ex.answer, ex.prompt)
            assert scores.binary_strict == 1.0, (ex.prompt, ex.target, scores)
            assert task.reward(ex.target, ex) == 1.0
            assert task.strict_accuracy(ex.target, ex) == 1.0
            seen.update(ex.answer.instruction_ids)
            assert 1 <= len(ex.answer.instruction_ids) <= 3
    # So every instruction family the generator uses is exercised by the checkers above.
    assert seen == set(GENERATOR_FAMILIES)


def test_targets_of_another_seed_and_default_instruction_count_also_pass():
    task = make_task(seed=7, sizes=dict(sft_size=300, train_size=0, validation_size=20,
                                        test_size=20))
    for ex in task.split("sft") + task.split("test"):
        assert len(ex.answer.instruction_ids) <= 2
        assert evaluate(ex.target, ex.answer, ex.prompt).binary_strict == 1.0, ex.prompt


def test_generated_kwargs_are_valid_ifeval_kwargs(task):
    # The instruction text is appended to the request, and kwargs use google's key names.
    for ex in task.split("train"):
        assert ex.prompt.startswith(ex.meta["request"])
        for family, kwargs in zip(ex.answer.instruction_ids, ex.answer.kwargs):
            if family == "length_constraints:number_words":
                assert set(kwargs) == {"relation", "num_words"}
                assert kwargs["relation"] in ("less than", "at least")
                if kwargs["relation"] == "less than":
                    assert kwargs["num_words"] <= 200
                assert str(kwargs["num_words"]) in ex.prompt
            if family == "keywords:existence":
                assert all(word in ex.prompt for word in kwargs["keywords"])
            if family == "combination:repeat_prompt":
                assert ex.answer.instruction_ids[-1] == family
                assert ex.prompt.startswith(kwargs["prompt_to_repeat"])


def test_drawn_instructions_never_conflict(task):
    table = conflicts()
    for split in SPLITS:
        for ex in task.split(split):
            ids = ex.answer.instruction_ids
            assert len(set(ids)) == len(ids)
            for i, a in enumerate(ids):
                for b in ids[i + 1:]:
                    assert b not in table[a] and a not in table[b]


def test_generator_is_deterministic_per_seed():
    a, b, c = make_task(seed=3), make_task(seed=3), make_task(seed=4)
    for split in SPLITS:
        assert [e.prompt for e in a.split(split)] == [e.prompt for e in b.split(split)]
        assert [e.target for e in a.split(split)] == [e.target for e in b.split(split)]
    assert [e.prompt for e in a.split("train")] != [e.prompt for e in c.split("train")]


def test_held_out_split_does_not_move_with_training_sizes():
    a = make_task(sizes=dict(sft_size=10, train_size=10, validation_size=15, test_size=15))
    b = make_task(sizes=dict(sft_size=50, train_size=5, validation_size=15, test_size=15))
    assert [e.prompt for e in a.split("test")] == [e.prompt for e in b.split("test")]


# ---- rewards ----------------------------------------------------------------------------------

def test_reward_is_the_fraction_of_instructions_satisfied(task):
    ex = example(["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}])
    both = "this is a short answer written in plain english without any capital letters."
    only_case = "this is a short answer, written in plain english without any capital letters."
    only_comma = "This is a short answer written in plain English with a capital letter."
    assert task.reward(both, ex) == 1.0
    assert task.reward(only_case, ex) == 0.5
    assert task.reward(only_comma, ex) == 0.5
    assert task.reward("THIS, ALSO FAILS BOTH OF THE INSTRUCTIONS GIVEN.", ex) == 0.0
    assert task.strict_accuracy(both, ex) == 1.0
    assert task.strict_accuracy(only_case, ex) == 0.0
    assert task.reward("", ex) == 0.0


def test_loose_and_strict_modes_and_extra_metrics():
    ex = example(["startend:quotation", "detectable_format:title"], [{}, {}])
    # A chatty first line breaks the quotation strictly; loose mode drops it.
    completion = 'Sure here it is:\n"<<A Title>> The answer."'
    loose, strict = make_task(sizes=_tiny()), make_task(sizes=_tiny(), reward_mode="strict")
    assert loose.reward(completion, ex) == 1.0
    assert strict.reward(completion, ex) == 0.5
    metrics = loose.extra_metrics(completion, ex)
    assert metrics == {"ifeval_strict_all": 0.0, "ifeval_loose_all": 1.0,
                       "ifeval_strict_fraction": 0.5, "ifeval_loose_fraction": 1.0,
                       "ifeval_instructions": 2, "ifeval_strict_followed": 1.0, "ifeval_loose_followed": 2.0}
    assert loose.strict_accuracy(completion, ex) == 0.0


def test_ifeval_four_metrics_pool_instructions_across_prompts():
    """IFEval's report, computed by hand: prompt-level is the share of prompts with every
    instruction followed; instruction-level pools instructions, so a 3-instruction prompt weighs 3."""
    task = make_task(sizes=_tiny())
    three = example(["startend:quotation", "detectable_format:title", "punctuation:no_comma"], [{}, {}, {}])
    one = example(["punctuation:no_comma"], [{}])
    completions = [
        (three, 'Sure here it is:\n"<<A Title>> The answer."'),  # strict 2 of 3 (quote), loose 3 of 3
        (one, "No commas here."),  # 1 of 1 both ways
        (one, "One, two."),  # 0 of 1 both ways
    ]
    per = [task.extra_metrics(c, ex) for ex, c in completions]
    arrays = {k: np.asarray([p[k] for p in per], dtype=float) for k in per[0]}
    report = task.split_metrics(arrays)
    assert report["prompt_level_strict_acc"] == pytest.approx(1 / 3)  # only the one-instruction success
    assert report["prompt_level_loose_acc"] == pytest.approx(2 / 3)
    assert report["inst_level_strict_acc"] == pytest.approx((2 + 1 + 0) / 5)
    assert report["inst_level_loose_acc"] == pytest.approx((3 + 1 + 0) / 5)
    # The mean of per-prompt fractions is a different number: (2/3 + 1 + 0) / 3.
    assert report["ifeval_strict_fraction"] == pytest.approx((2 / 3 + 1) / 3)


def _tiny() -> dict:
    return dict(sft_size=2, train_size=2, validation_size=2, test_size=2)


def test_number_sentences_works_offline(task):
    ex = example(["length_constraints:number_sentences"],
                 [{"relation": "less than", "num_sentences": 3}])
    assert task.reward("One idea. Two ideas.", ex) == 1.0
    assert task.reward("One idea. Two ideas. Three ideas. Four ideas.", ex) == 0.0


def test_capital_word_frequency_works_offline(task):
    # The library word-tokenizes with a punkt sentence pass; ours needs no nltk data (checks.py).
    ex = example(["change_case:capital_word_frequency"],
                 [{"capital_frequency": 2, "capital_relation": "at least"}])
    assert task.reward("THIS is VERY important.", ex) == 1.0
    assert task.reward("This is very important.", ex) == 0.0


# A machine with nltk's punkt_tab data and one without score in separate processes: the checkers
# are prepared once per process. "with" installs a punkt_tab model that knows the abbreviation
# "dr", as the real English model does; "without" makes every nltk data lookup fail.
_NLTK_DATA_PROBE = """
import json, sys
import nltk
if sys.argv[1] == "without":
    def missing(resource, *args, **kwargs):
        raise LookupError(resource)
    nltk.data.find = missing
from essa.tasks.ifeval import IfevalItem, count_sentences, evaluate
text = sys.argv[2]
try:
    nltk_sentences = len(nltk.sent_tokenize(text))
except LookupError:
    nltk_sentences = None
item = IfevalItem.build("t", ["length_constraints:number_sentences"],
                        [{"relation": "less than", "num_sentences": 3}])
print(json.dumps({"nltk": nltk_sentences, "checker": count_sentences(text),
                  "verdict": evaluate(text, item, "x").binary_strict}))
"""


def _probe_nltk_data(mode: str, text: str, data_dir: Path) -> dict:
    env = dict(os.environ, NLTK_DATA=str(data_dir),
               PYTHONPATH=os.pathsep.join([str(Path(essa.__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _NLTK_DATA_PROBE, mode, text], env=env, cwd=data_dir,
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_checks_give_the_same_verdict_with_and_without_nltk_data(tmp_path):
    model = tmp_path / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)
    (model / "abbrev_types.txt").write_text("dr\n")
    for name in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
        (model / name).write_text("")
    text = "Dr. Smith arrived. He sat down."
    with_data = _probe_nltk_data("with", text, tmp_path)
    without = _probe_nltk_data("without", text, tmp_path)
    assert with_data["nltk"] == 2 and without["nltk"] is None  # the data is really used / really absent
    # The documented count: no abbreviation list, so "Dr." ends a sentence (checks.py).
    assert with_data["checker"] == without["checker"] == 3
    assert with_data["verdict"] == without["verdict"] == 0.0


def test_case_reward_is_deterministic(task):
    # Unseeded, langdetect reads this text as English on some calls and German on others.
    ex = example(["change_case:english_capital"], [{}])
    text = "THE DOG HAS SOFT BROWN FUR AND A WAGGING TAIL. HE GREETS EVERY VISITOR AT THE DOOR."
    task.reward(text, ex)  # prepares the checkers
    uncached = evaluate.__wrapped__
    values = {uncached(text, ex.answer, ex.prompt).partial_loose for _ in range(30)}
    assert len(values) == 1


def test_safe_reward_scores_a_broken_example_zero(task):
    broken = Example(prompt="x", answer=None)
    assert safe_reward(task, "anything", broken) == 0.0


# ---- IFEval files -----------------------------------------------------------------------------

IFEVAL_ROWS = [
    {"key": 1000, "prompt": "Write a haiku about rain. Do not use any commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 1001, "prompt": "Describe Paris in all lowercase letters.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"key": 1002, "prompt": "Write a limerick. End it with the phrase 'Is there anything else?'",
     "instruction_id_list": ["startend:end_checker"],
     "kwargs": [{"end_phrase": "Is there anything else?"}]},
    {"key": 1003, "prompt": "List two fruits as markdown bullets and add a title.",
     "instruction_id_list": ["detectable_format:number_bullet_lists", "detectable_format:title"],
     # The hub copy stores unused kwargs as nulls.
     "kwargs": [{"num_bullets": 2, "end_phrase": None}, {"num_bullets": None}]},
    {"key": 1004, "prompt": "Explain tides in fewer than 3 sentences.",
     "instruction_id_list": ["length_constraints:number_sentences"],
     "kwargs": [{"relation": "less than", "num_sentences": 3}]},
    {"key": 1005, "prompt": "Say hi with at least 2 all-capital words.",
     "instruction_id_list": ["change_case:capital_word_frequency"],
     "kwargs": [{"capital_frequency": 2, "capital_relation": "at least"}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_eval_file_gives_validation_and_test(tmp_path):
    path = write_jsonl(tmp_path / "input_data.jsonl", IFEVAL_ROWS)
    sizes = dict(sft_size=20, train_size=10, validation_size=2, test_size=3)
    task = make_task(sizes=sizes, eval_file=path)
    val, test = task.split("validation"), task.split("test")
    assert len(val) == 2 and len(test) == 3
    file_prompts = {r["prompt"] for r in IFEVAL_ROWS}
    assert {e.prompt for e in val + test} <= file_prompts
    assert not {e.prompt for e in val} & {e.prompt for e in test}
    assert all(e.target is None and e.meta["source"] == "ifeval" for e in val + test)
    assert not {e.prompt for e in task.split("sft") + task.split("train")} & file_prompts
    # Rewards of file rows come from the same checkers.
    row = next(e for e in val + test)
    assert 0.0 <= task.reward("A plain answer.", row) <= 1.0


def test_eval_file_rows_score_as_expected(tmp_path):
    path = write_jsonl(tmp_path / "input_data.jsonl", IFEVAL_ROWS)
    task = make_task(sizes=dict(sft_size=1, train_size=1, validation_size=0, test_size=6),
                     eval_file=path)
    rows = {e.meta["key"]: e for e in task.split("test")}
    assert rows[1003].answer.kwargs == [{"num_bullets": 2}, {}]  # hub-style nulls dropped
    assert task.reward("Soft rain falls down", rows[1000]) == 1.0
    assert task.reward("Soft rain, falls down", rows[1000]) == 0.0
    assert task.reward("<<Fruit>>\n* apple\n* pear", rows[1003]) == 1.0
    assert task.reward("<<Fruit>>\n* apple", rows[1003]) == 0.5


def test_eval_file_errors(tmp_path):
    sizes = dict(sft_size=2, train_size=2, validation_size=2, test_size=2)
    missing = write_jsonl(tmp_path / "missing.jsonl",
                          IFEVAL_ROWS[:2] + [{"key": 9, "prompt": "x", "kwargs": [{}]}])
    with pytest.raises(EssaError, match=r"missing\.jsonl: line 3 has no 'instruction_id_list'"):
        make_task(sizes=sizes, eval_file=missing)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", IFEVAL_ROWS[:1] + [
        {"key": 9, "prompt": "x", "instruction_id_list": ["made:up"], "kwargs": [{}]}])
    with pytest.raises(EssaError, match="row 2 uses unknown instruction id 'made:up'"):
        make_task(sizes=sizes, eval_file=unknown)
    with pytest.raises(EssaError, match="has 6 distinct prompts"):
        make_task(sizes=dict(sizes, test_size=5), eval_file=write_jsonl(tmp_path / "ok.jsonl",
                                                                          IFEVAL_ROWS))


def test_bad_options_are_rejected():
    with pytest.raises(EssaError, match="unknown option"):
        make_task(sizes=_tiny(), eval_fil="x.jsonl")
    with pytest.raises(EssaError, match="reward_mode"):
        make_task(sizes=_tiny(), reward_mode="medium")
    with pytest.raises(EssaError, match="max_instructions"):
        make_task(sizes=_tiny(), max_instructions=5)


def test_task_loads_by_factory_path():
    task = get_task(TaskConfig(name="essa.tasks.ifeval:IfevalTask", **_tiny()))
    assert isinstance(task, IfevalTask)
    assert len(task.checked_split("validation")) == 2


def test_a_checker_with_an_invalid_kwarg_scores_alike_whatever_the_random_state():
    # IFEval's letter_frequency draws a random letter when given "!" (as two of IFEval's prompts do);
    # the score of one completion must not depend on the caller's random state, nor change it.
    import random

    item = IfevalItem.build("k", ["keywords:letter_frequency"],
                            [{"letter": "!", "let_frequency": 3, "let_relation": "at least"}])
    evaluate("warm up: the checkers' first import may draw from random", item, "p")
    verdicts = set()
    for seed in range(20):
        random.seed(seed)
        before = random.getstate()
        evaluate.cache_clear()
        verdicts.add(evaluate("aaa bbb ccc ddd eee", item, "Use ! three times.").partial_loose)
        assert random.getstate() == before
    assert len(verdicts) == 1
