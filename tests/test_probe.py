"""The signal probe and essa.sigma0: auto."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from essa.backends import Backend
from essa.probe import ProbeRow, choose_sigma0, probe_signal, split_half_rho
from essa.tasks import Example, Task, format_prompt
from helpers import tiny_tokenizer


class ThresholdTask(Task):
    name = "threshold"

    def __init__(self, n: int = 40):
        self.examples = [Example(prompt=f"q{i}", answer=i / n) for i in range(n)]

    def split(self, name):
        return self.examples

    def reward(self, completion, example):
        return float(completion == "yes")


class SensitiveBackend(Backend):
    """A candidate answers "yes" to prompt i when sensitivity * |z| exceeds the prompt's threshold:
    the larger the sensitivity, the smaller the step that changes answers."""

    def __init__(self, sensitivity: float, dim: int = 6):
        self.sensitivity = sensitivity
        self._dim = dim
        self.thresholds: dict[str, float] = {}

    @property
    def dim(self) -> int:
        return self._dim

    def evaluate(self, population, prompts, seed=0, candidate_offset=0, prompt_offset=0):
        out = []
        for z in population:
            size = self.sensitivity * float(np.abs(z).mean())
            out.append(["yes" if size > self.thresholds.setdefault(p, 0.05 + zlib.crc32(p.encode()) % 97 / 97) else "no"
                        for p in prompts])
        return out


@pytest.mark.parametrize("sensitivity", [1.0, 10.0])
def test_probe_reports_changes_and_flips_that_grow_with_sigma(sensitivity):
    task = ThresholdTask()
    rows = probe_signal(SensitiveBackend(sensitivity), tiny_tokenizer(), task, task.examples,
                        sigmas=(0.01, 0.1, 1.0), candidates=6)
    flips = [r.flipped for r in rows]
    assert flips == sorted(flips) and flips[-1] > 0
    assert all(r.changed == r.flipped for r in rows)  # here every changed answer flips the reward
    assert all(r.start_fitness == 0.0 and r.binomial_sd == 0.0 for r in rows)


def test_auto_sigma_is_larger_where_outputs_barely_change():
    task = ThresholdTask()
    sigmas = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
    sensitive, dull = (choose_sigma0(probe_signal(SensitiveBackend(k), tiny_tokenizer(), task, task.examples, sigmas),
                                     rule="flips") for k in (20.0, 1.0))
    assert sensitive < dull


def test_probe_stops_at_the_first_sigma_that_flips_enough():
    task = ThresholdTask()
    sigmas = (0.8, 0.02, 0.2, 0.05)  # probed in ascending order whatever the order given
    full = probe_signal(SensitiveBackend(20.0), tiny_tokenizer(), task, task.examples, sigmas)
    short = probe_signal(SensitiveBackend(20.0), tiny_tokenizer(), task, task.examples, sigmas, stop_at_flips=0.1)
    assert [r.sigma for r in full] == sorted(sigmas)
    # The start solves none of the prompts, so the largest step was probed first (and flipped enough).
    first, largest = short[:-1], short[-1]
    assert largest == full[-1] and first == full[:len(first)] and len(short) < len(full)
    assert first[-1].flipped >= 0.1 and all(r.flipped < 0.1 for r in first[:-1])
    assert choose_sigma0(short, 0.1, rule="flips") == choose_sigma0(full, 0.1, rule="flips")


def test_probe_of_a_start_that_solves_nothing_stops_when_even_the_largest_step_flips_nothing():
    task = ThresholdTask()
    backend = SensitiveBackend(0.01)  # no step up to 0.8 reaches a threshold: every answer stays "no"
    sigmas = (0.1, 0.2, 0.4, 0.8)
    full = probe_signal(backend, tiny_tokenizer(), task, task.examples, sigmas)
    short = probe_signal(backend, tiny_tokenizer(), task, task.examples, sigmas, stop_at_flips=0.1)
    assert [r.flipped for r in full] == [0.0] * 4
    assert short == [full[-1]]  # one step probed instead of four
    assert choose_sigma0(short, 0.1, rule="flips") == choose_sigma0(full, 0.1, rule="flips") == 0.8


class LenientTask(ThresholdTask):
    """"yes!" counts as yes and "no!" as no: an answer can change without its reward changing."""

    def reward(self, completion, example):
        return float(completion.rstrip("!") == "yes")


class TwoWayBackend(SensitiveBackend):
    """The start says "yes" to the prompts in `start_yes`. A step past a prompt's threshold turns the
    answer over (yes -> no or no -> yes); a step past half of it only adds "!". Every answer given
    is recorded, so a test can count flips itself."""

    def __init__(self, sensitivity: float, start_yes: set[str]):
        super().__init__(sensitivity)
        self.start_yes = start_yes
        self.answers: list[list[list[str]]] = []

    def evaluate(self, population, prompts, seed=0, candidate_offset=0, prompt_offset=0):
        out = []
        for z in population:
            size = self.sensitivity * float(np.abs(z).mean())
            row = []
            for p in prompts:
                start = "yes" if p in self.start_yes else "no"
                threshold = 0.05 + zlib.crc32(p.encode()) % 97 / 97
                turned = "no" if start == "yes" else "yes"
                row.append(turned if size > threshold else start + "!" if size > threshold / 2 else start)
            out.append(row)
        self.answers.append(out)
        return out


def test_probe_counts_flips_both_ways_and_changes_that_keep_the_reward():
    task = LenientTask()
    tokenizer = tiny_tokenizer()
    prompts = [format_prompt(tokenizer, task, ex) for ex in task.examples]
    backend = TwoWayBackend(4.0, start_yes=set(prompts[::2]))
    rows = probe_signal(backend, tokenizer, task, task.examples, (0.02, 0.1, 0.4, 1.6), stop_at_flips=0.3)
    start = backend.answers[0][0]
    assert [r.start_fitness for r in rows] == [0.5] * len(rows)
    assert [r.sigma for r in rows] == [0.02, 0.1, 0.4, 1.6][:len(rows)] and 1 < len(rows) < 4
    assert all(r.flipped < 0.3 for r in rows[:-1]) and rows[-1].flipped >= 0.3
    up = down = 0
    for row, answers in zip(rows, backend.answers[1:]):
        pairs = [(s, a) for cand in answers for s, a in zip(start, cand)]
        turned_up = sum(s == "no" and a == "yes" for s, a in pairs)
        turned_down = sum(s == "yes" and a == "no" for s, a in pairs)
        up, down = up + turned_up, down + turned_down
        assert row.flipped == pytest.approx((turned_up + turned_down) / len(pairs))
        assert row.changed == pytest.approx(sum(s != a for s, a in pairs) / len(pairs))
    assert up > 0 and down > 0  # flips from the start's right and wrong answers alike
    assert any(r.changed > r.flipped for r in rows)  # "yes!" changed the text, not the reward


def test_choose_sigma0_takes_the_smallest_step_that_flips_enough():
    def row(sigma, flipped):
        return ProbeRow(sigma, flipped, flipped, 0.5, 0.5, 0.0, 0.05, None)

    assert choose_sigma0([row(0.4, 0.2), row(0.1, 0.01), row(0.2, 0.12)], rule="flips") == 0.2
    # none reaches the target: the largest
    assert choose_sigma0([row(0.1, 0.0), row(0.2, 0.01)], rule="flips") == 0.2
    assert choose_sigma0([row(0.1, 0.3)], target_flips=0.5, rule="flips") == 0.1


class DestructiveBackend(SensitiveBackend):
    """The start says "yes" (the right answer) to the prompts in `start_yes`; a step past a prompt's
    threshold turns it to "no" and never the other way: larger steps only lose right answers."""

    def __init__(self, sensitivity: float, start_yes: set[str]):
        super().__init__(sensitivity)
        self.start_yes = start_yes

    def evaluate(self, population, prompts, seed=0, candidate_offset=0, prompt_offset=0):
        out = []
        for z in population:
            size = self.sensitivity * float(np.abs(z).mean())
            out.append(["yes" if p in self.start_yes and size <= 0.05 + zlib.crc32(p.encode()) % 97 / 97 else "no"
                        for p in prompts])
        return out


def _destructive(share_right: float, sensitivity: float = 1.0):
    task = ThresholdTask(n=64)
    tokenizer = tiny_tokenizer()
    prompts = [format_prompt(tokenizer, task, ex) for ex in task.examples]
    right = set(prompts[:round(share_right * len(prompts))])
    return task, tokenizer, DestructiveBackend(sensitivity, right)


@pytest.mark.parametrize("share_right", [0.03, 0.10, 0.35])
def test_the_harm_rule_takes_the_largest_step_that_keeps_the_starts_right_answers(share_right):
    """Steps only lose right answers here. The rule takes the largest probed step whose candidates
    are not worse than the start beyond noise: every step where the start solves about nothing
    (there is nothing to lose), a smaller one the more the start solves, never one that harms."""
    task, tokenizer, backend = _destructive(share_right)
    sigmas = (0.1, 0.2, 0.4, 0.8)
    full = probe_signal(backend, tokenizer, task, task.examples, sigmas)
    chosen = choose_sigma0(full, rule="harm")
    row = {r.sigma: r for r in full}
    assert not row[chosen].harms()
    assert all(r.harms() for r in full if r.sigma > chosen)
    assert row[0.8].loss_vs_start == pytest.approx(row[0.8].start_fitness - row[0.8].candidate_mean)
    if share_right < 0.05:
        assert chosen == 0.8
    else:
        assert chosen < 0.8 and row[0.8].harms()
    short = probe_signal(backend, tokenizer, task, task.examples, sigmas, stop_at_harm=True)
    assert choose_sigma0(short, rule="harm") == chosen and len(short) <= len(full)
    if chosen == 0.8:
        assert short == [row[0.8]]  # a harmless largest step settles it: nothing else probed


def test_the_flip_rule_takes_a_step_that_harms_a_start_near_ten_percent():
    """What the harm rule is for: near a 10% start no step flips 10% of the rewards, so the flip
    rule falls back to the largest, which throws away most of the start's right answers."""
    task, tokenizer, backend = _destructive(0.10)
    rows = probe_signal(backend, tokenizer, task, task.examples, (0.1, 0.2, 0.4, 0.8))
    flips_choice = choose_sigma0(rows, rule="flips")
    assert flips_choice == 0.8 and next(r for r in rows if r.sigma == 0.8).harms()
    assert choose_sigma0(rows, rule="harm") < flips_choice


def test_harm_needs_a_loss_beyond_the_paired_noise():
    def row(sigma, loss, se):
        return ProbeRow(sigma, 0.1, 0.1, 0.3, 0.3 - loss, 0.0, 0.05, None, loss, se)

    assert not row(0.1, 0.02, 0.02).harms() and row(0.1, 0.04, 0.02).harms()
    assert not row(0.1, -0.5, 0.0).harms() and row(0.1, 0.01, 0.0).harms()
    # Not significant (1.3 standard errors), but the candidates keep a third of the start's 0.3.
    assert row(0.1, 0.2, 0.15).harms() and not row(0.1, 0.14, 0.10).harms()
    assert not row(0.1, 0.2, 0.25).harms()  # halved, but within one standard error: a coin flip
    rows = [row(0.8, 0.2, 0.05), row(0.1, 0.0, 0.01), row(0.4, 0.1, 0.05), row(0.2, 0.01, 0.02)]
    assert choose_sigma0(rows, rule="harm") == 0.2  # the largest below the first harmful step
    assert choose_sigma0([row(0.1, 0.1, 0.01), row(0.2, 0.0, 0.01)], rule="harm") == 0.1  # the smallest harms


def test_split_half_rho():
    rewards = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=float)
    assert split_half_rho(rewards) == pytest.approx(1.0)  # both halves rank the candidates alike
    assert split_half_rho(np.ones((3, 4))) is None  # a tie everywhere says nothing
    flipped = np.array([[1, 0], [0, 1], [1, 1]], dtype=float)
    assert split_half_rho(flipped) == pytest.approx(-0.5)
