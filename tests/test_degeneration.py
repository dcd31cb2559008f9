"""Degeneration figures: repeated n-grams, token-limit hits, length, missing answers."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_tokenizer

from essa import degeneration


def test_repeated_ngram_share_by_hand():
    assert degeneration.repeated_ngram_share([1, 2, 3, 4, 5, 6]) == 0.0
    # 8 tokens -> 5 four-grams, of which 4 distinct: 1 of 5 repeats an earlier one.
    assert degeneration.repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 - 4 / 5)
    assert degeneration.repeated_ngram_share([7, 8] * 20) > 0.9
    assert degeneration.repeated_ngram_share([1, 2]) == 0.0


def test_a_loop_without_spaces_counts_as_repetition():
    tok = tiny_tokenizer()
    loop = "ab" * 30
    figures = degeneration.per_completion([loop, "abcdefg"], tok, 1000, answers=False)
    assert figures["repetition"][0] > 0.8 and figures["repetition"][1] == 0.0


def test_has_answer_needs_a_non_empty_box():
    assert degeneration.has_answer("so \\boxed{3}.")
    assert not degeneration.has_answer("so \\boxed{ }.")
    assert not degeneration.has_answer("the answer is 3")


def test_per_completion_and_summary():
    tok = tiny_tokenizer()
    completions = ["ab \\boxed{1}", "abababab abababab abababab", ""]
    lengths = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in completions]
    limit = lengths[1]  # the second one used every token it was allowed
    figures = degeneration.per_completion(completions, tok, limit, answers=True)
    assert figures["tokens"].tolist() == lengths
    assert figures["hit_limit"].tolist() == [float(n >= limit) for n in lengths] == [0.0, 1.0, 0.0]
    assert figures["no_answer"].tolist() == [0.0, 1.0, 1.0]
    summary = degeneration.summarize(figures)
    assert summary["hit_limit_share"] == pytest.approx(1 / 3)
    assert summary["no_answer_share"] == pytest.approx(2 / 3)
    assert summary["mean_tokens"] == pytest.approx(np.mean(lengths))
    assert "no_answer" not in degeneration.per_completion(completions, tok, limit, answers=False)


def test_generated_token_counts_win_over_tokenizing_again():
    """A loop of odd tokens re-tokenizes shorter than it was generated: the engine's counts decide."""
    tok = tiny_tokenizer()
    figures = degeneration.per_completion(["ab", "ab"], tok, 4, answers=False, token_counts=[4, 2])
    assert figures["tokens"].tolist() == [4.0, 2.0] and figures["hit_limit"].tolist() == [1.0, 0.0]


def test_local_backend_reports_the_generated_lengths():
    from helpers import tiny_llama

    from essa.backends.local import LocalBackend
    from essa.config import DecodingConfig
    from essa.evaluate import evaluate_split
    from essa.tasks import Example, Task

    class Echo(Task):
        name = "echo"

        def split(self, name):
            return []

        def reward(self, completion, example):
            return 0.0

    backend = LocalBackend(tiny_llama(seed=0), tok := tiny_tokenizer(), None, DecodingConfig(max_new_tokens=5))
    examples = [Example(prompt=p) for p in ("a", "bb", "ccc")]
    result = evaluate_split(backend, tok, Echo(), examples)
    assert result.token_counts == [len(t) for t in backend.last_decode.tokens]
    assert all(0 <= n <= 5 for n in result.token_counts) and len(result.token_counts) == 3
    generate = LocalBackend(tiny_llama(seed=0), tok, None, DecodingConfig(max_new_tokens=5, engine="generate"))
    assert evaluate_split(generate, tok, Echo(), examples).token_counts is None


def test_side_by_side_names_each_figure_of_both_models_and_only_boxed_tasks_report_answers():
    from essa.degeneration import asks_for_box, side_by_side
    from essa.tasks.gsm8k import SYSTEM_PROMPT as MATH_PROMPT
    from essa.tasks.ifeval import SYSTEM_PROMPT as IFEVAL_PROMPT

    before = {"hit_limit_share": 0.1, "repeated_4gram_share": 0.05, "mean_tokens": 80.0, "no_answer_share": 0.2}
    after = {"hit_limit_share": 0.9, "repeated_4gram_share": 0.6, "mean_tokens": 191.5, "no_answer_share": 0.7}
    line = side_by_side(before, after, ("SFT", "ESSA"))
    assert line == ("degeneration, SFT -> ESSA: hit the token limit 0.10 -> 0.90, repeated 4-grams 0.05 -> 0.60, "
                    "mean tokens 80.0 -> 191.5, no boxed answer 0.20 -> 0.70")
    without = {k: v for k, v in before.items() if k != "no_answer_share"}
    assert "boxed" not in side_by_side(without, without, ("a", "b"))
    assert asks_for_box(MATH_PROMPT) and not asks_for_box(IFEVAL_PROMPT) and not asks_for_box(None)
