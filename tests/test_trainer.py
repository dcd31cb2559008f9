"""The ESSA loop on a tiny model: rewards flow to the optimizer, checkpoints resume exactly."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

from adapters import make_random_adapter
from essa.backends.local import LocalBackend
from essa.config import DecodingConfig, SearchConfig
from essa.errors import EssaError
from essa.io import atomic_write_state, read_state
from essa.svd_space import SvdLoraSpace
from essa.tasks import Example, Task, format_prompt
from essa.trainer import EssaTrainer, GuardSet, choose_final
from helpers import tiny_llama, tiny_tokenizer

torch.set_num_threads(1)


class VowelTask(Task):
    """Reward 1 when the completion holds a vowel: on the tiny model candidates differ in both
    fitness and validation accuracy, so comparisons of either are not vacuous."""

    name = "vowels"

    def split(self, name):
        offset = {"sft": 0, "train": 100, "validation": 200, "test": 300}[name]
        return [Example(prompt=f"say {offset + i}", answer=None) for i in range(6)]

    def reward(self, completion, example):
        return float(any(c in "aeiou" for c in completion))


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return make_random_adapter(tiny_llama(seed=0), tmp_path_factory.mktemp("a") / "sft", rank=2)


def make_trainer(adapter_dir, run_dir, generations, on_generation=None, optimizer="sep-cma", time_budget_s=None,
                 **search_settings):
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    space = SvdLoraSpace.from_adapter(adapter_dir, 1.0, model=model)
    backend = LocalBackend(model, tok, space, DecodingConfig(max_new_tokens=6, batch_size=32))
    search = SearchConfig(**{**dict(optimizer=optimizer, popsize=4, sigma0=0.5, prompts_per_generation=3,
                                    generations=generations, time_budget_s=time_budget_s, eval_every=2, seed=7),
                             **search_settings})
    # guard_sets only switch the guard on here: the tests give the trainer its guard sets.
    guards = [GuardSet(name, VowelTask(), VowelTask().split("test")) for name in search.guard_sets]
    return EssaTrainer(backend, tok, VowelTask(), search, run_dir, progress=False,
                       on_generation=on_generation, guards=guards)


def validation_history(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_accuracy"] for r in lines if "val_accuracy" in r]


def fitness_history(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["generation"], r["fitness_mean"], r["fitness_max"], r["sigma"]) for r in lines if "fitness_mean" in r]


@pytest.mark.parametrize("optimizer", ["cma", "sep-cma", "openai-es"])
def test_kill_and_resume_matches_uninterrupted_run(adapter_dir, tmp_path, optimizer):
    straight = make_trainer(adapter_dir, tmp_path / "straight", 4, optimizer=optimizer).run()

    def kill_after_two(state):
        if state.generation == 2:
            raise Killed

    with pytest.raises(Killed):
        make_trainer(adapter_dir, tmp_path / "killed", 4, kill_after_two, optimizer=optimizer).run()
    assert len(fitness_history(tmp_path / "killed")) == 2
    resumed = make_trainer(adapter_dir, tmp_path / "killed", 4, optimizer=optimizer).run(resume=True)

    assert fitness_history(tmp_path / "killed") == fitness_history(tmp_path / "straight")
    assert np.array_equal(resumed.final_z, straight.final_z)
    assert resumed.final_choice == straight.final_choice and resumed.validation == straight.validation
    # Fitness and validation accuracy are informative (candidates differed), so the comparisons
    # above are not vacuous.
    assert any(h[2] > h[1] for h in fitness_history(tmp_path / "straight"))
    assert len(set(validation_history(tmp_path / "straight"))) > 1


def test_run_writes_metrics_checkpoint_and_validation_best_choice(adapter_dir, tmp_path):
    result = make_trainer(adapter_dir, tmp_path, 3).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == [0, 1, 2, 3]
    assert [r["validated"] for r in records if "val_accuracy" in r] == ["start", "mean"]  # gen 0 and eval_every 2
    clock = [r["wall_clock_s"] for r in records]
    assert clock == sorted(clock) and clock[-1] == pytest.approx(result.state.elapsed_s, abs=1e-3)
    for r in records[1:]:  # one distinct value exactly when all candidates tied
        assert 1 <= r["distinct_fitness"] <= 4
        assert (r["distinct_fitness"] == 1) == (r["fitness_max"] == r["fitness_min"])
    assert any(r["distinct_fitness"] > 1 for r in records[1:])
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["choice"] == result.final_choice
    accuracies = final["validation_accuracy"]
    assert len(set(accuracies.values())) > 1, accuracies  # the candidates really differ
    assert set(final["versus_start"]) == set(accuracies) - {"start"} and result.validation == accuracies
    # Six validation prompts: three select, three judge, and three cannot show a challenger better
    # with confidence (3 gained, 0 lost has a sign-test p of 0.25): the start stays.
    assert (final["selection_examples"], final["judgement_examples"]) == (3, 3)
    assert all(c["n"] == 3 for c in final["versus_start"].values())
    assert final["choice"] == "start" and not result.final_z.any()
    assert (tmp_path / "checkpoint.npz").is_file()


def test_final_challengers_limit_what_is_validated_and_compared(adapter_dir, tmp_path, monkeypatch):
    import essa.trainer

    validated = []

    def counting(backend, tokenizer, task, examples, z):
        validated.append(np.array(z[0]))
        return evaluate_split(backend, tokenizer, task, examples, z)

    evaluate_split = essa.trainer.evaluate_split
    monkeypatch.setattr(essa.trainer, "evaluate_split", counting)
    result = make_trainer(adapter_dir, tmp_path, 3, eval_every=0, final_challengers=["mean"]).run()
    final = json.loads((tmp_path / "final.json").read_text())
    assert set(final["validation_accuracy"]) == {"start", "mean"} and set(final["versus_start"]) == {"mean"}
    # Three validations: the start on the selection half, then on the judgement half the start
    # and the final mean, which has moved.
    assert len(validated) == 3 and not validated[0].any() and not validated[1].any() and validated[2].any()
    assert result.validation == final["validation_accuracy"]
    # All three (the default) on the same run: the best candidate is validated too.
    make_trainer(adapter_dir, tmp_path / "all", 3, eval_every=0).run()
    all_three = json.loads((tmp_path / "all" / "final.json").read_text())
    assert set(all_three["validation_accuracy"]) == {"start", "mean", "best_candidate"}
    assert all_three["validation_accuracy"]["mean"] == final["validation_accuracy"]["mean"]


def test_best_validated_mean_alone_needs_in_loop_validation():
    with pytest.raises(EssaError, match="needs in-loop validation"):
        SearchConfig(final_challengers=["best_validated_mean"], eval_every=0)
    assert SearchConfig(final_challengers=["best_validated_mean"], eval_every=3).final_challengers


def test_final_choice_needs_a_confident_win_over_the_start():
    rng = np.random.default_rng(0)
    start = (rng.random(200) < 0.4).astype(float)
    better = start.copy()
    better[np.flatnonzero(start == 0)[:30]] = 1.0  # 30 problems gained, none lost: +0.15
    slightly = start.copy()
    slightly[np.flatnonzero(start == 0)[:3]] = 1.0  # +0.015: inside the noise
    best = better.copy()
    best[np.flatnonzero(better == 0)[:5]] = 1.0
    assert choose_final(start, {"mean": slightly})[0] == "start"
    choice, versus = choose_final(start, {"mean": better, "best_candidate": slightly})
    assert choice == "mean" and versus["mean"].ci95[0] > 0 >= versus["best_candidate"].ci95[0]
    assert choose_final(start, {"mean": better, "best_validated_mean": best})[0] == "best_validated_mean"
    worse = start.copy()
    worse[np.flatnonzero(start == 1)[:30]] = 0.0
    assert choose_final(start, {"mean": worse})[0] == "start"


@pytest.mark.parametrize("gained, n, others, chosen", [
    (3, 6, 0, "start"),    # a bootstrap interval from +0.167 would take it; the sign test's p is 0.25
    (4, 64, 0, "start"),   # bootstrap (+0.016, +0.125) would take it; p = 0.125
    (6, 64, 0, "mean"),    # p = 0.031 < 0.05: a gain when it is the only challenger
    (6, 64, 2, "start"),   # ... but not among three challengers (each tested at 0.05 / 3)
    (8, 64, 2, "mean"),    # p = 0.0078 < 0.0167
])
def test_final_choice_holds_at_few_discordant_examples_and_corrects_for_challengers(gained, n, others, chosen):
    start = np.zeros(n)
    challenger = start.copy()
    challenger[:gained] = 1.0
    challengers = {"mean": challenger, **{f"other{i}": start.copy() for i in range(others)}}
    assert choose_final(start, challengers)[0] == chosen


def test_validation_halves_alternate_and_a_single_example_is_refused():
    from essa.trainer import split_validation

    examples = [Example(prompt=str(i), answer=None) for i in range(7)]
    selection, judgement = split_validation(examples)
    assert [e.prompt for e in selection] == ["0", "2", "4", "6"] and [e.prompt for e in judgement] == ["1", "3", "5"]
    with pytest.raises(EssaError, match="at least 2 examples"):
        split_validation(examples[:1])


def test_existing_run_is_not_overwritten_without_resume(adapter_dir, tmp_path):
    make_trainer(adapter_dir, tmp_path, 1).run()
    with pytest.raises(EssaError, match="--resume"):
        make_trainer(adapter_dir, tmp_path, 2).run()


def test_time_budget_stops_the_run(adapter_dir, tmp_path):
    result = make_trainer(adapter_dir, tmp_path, None, time_budget_s=0.0).run()
    assert result.state.generation == 0


class RunsCode:
    """Unpickling this touches a file: the proof that a loader ran code from the file it read."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_checkpoint_of_an_older_essa_is_never_loaded(adapter_dir, tmp_path):
    marker = tmp_path / "code-ran"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pkl").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(EssaError, match="checkpoint.pkl of an older essa, which is not loaded"):
        make_trainer(adapter_dir, run_dir, 2).run(resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("optimizer", ["cma", "sep-cma"])
def test_tampered_cma_state_runs_no_code_and_says_so(adapter_dir, tmp_path, optimizer):
    """pycma's strategy is stored pickled inside the .npz; it loads through an unpickler that only
    rebuilds numpy arrays and pycma's classes."""
    run_dir, marker = tmp_path / "run", tmp_path / "code-ran"
    make_trainer(adapter_dir, run_dir, 1, optimizer=optimizer).run()
    tree = read_state(run_dir / "checkpoint.npz")
    tree["optimizer"]["es"] = np.frombuffer(pickle.dumps(RunsCode(marker)), dtype=np.uint8)
    atomic_write_state(run_dir / "checkpoint.npz", tree)
    with pytest.raises(EssaError, match="posix.system is not allowed in an optimizer state"):
        make_trainer(adapter_dir, run_dir, 2, optimizer=optimizer).run(resume=True)
    assert not marker.exists()


def test_checkpoint_with_a_pickled_entry_runs_no_code_and_says_so(adapter_dir, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "code-ran"
    run_dir.mkdir()
    buf = io.BytesIO()
    np.savez(buf, __tree__=np.array([RunsCode(marker)], dtype=object))  # np.load would unpickle it
    (run_dir / "checkpoint.npz").write_bytes(buf.getvalue())
    with pytest.raises(EssaError, match="cannot read state file .*allow_pickle=False"):
        make_trainer(adapter_dir, run_dir, 2).run(resume=True)
    assert not marker.exists()


def test_guard_asks_qualifiers_in_order_and_keeps_the_start_when_all_fail():
    start = np.zeros(40)
    better, best = start.copy(), start.copy()
    better[:20], best[:30] = 1.0, 1.0
    asked = []

    def refuse(name):
        asked.append(name)
        return name != "best_candidate"

    assert choose_final(start, {"mean": better, "best_candidate": best}, passes_guard=refuse)[0] == "mean"
    assert asked == ["best_candidate", "mean"]  # highest validation accuracy first
    asked.clear()
    worse = start.copy()
    assert choose_final(start, {"mean": worse, "best_candidate": best},
                        passes_guard=lambda n: asked.append(n) or False)[0] == "start"
    assert asked == ["best_candidate"]  # a challenger that did not qualify is never guarded


def test_guard_verdict_rejects_only_a_loss_beyond_noise():
    from essa.stats import compare_paired
    from essa.trainer import guard_verdict

    start = np.ones(50)
    lost_some = start.copy()
    lost_some[:2] = 0.0  # -4 points: the interval reaches zero
    lost_many = start.copy()
    lost_many[:10] = 0.0
    assert guard_verdict({"a": compare_paired(start, lost_some)})
    assert not guard_verdict({"a": compare_paired(start, start), "b": compare_paired(start, lost_many)})


def test_guard_sets_score_start_and_challenger_and_decide_the_final_choice(adapter_dir, tmp_path, monkeypatch):
    from essa.stats import compare_paired
    from essa.trainer import GuardSet

    guard = GuardSet("other", VowelTask(), VowelTask().split("test"))
    trainer = make_trainer(adapter_dir, tmp_path, 2, eval_every=0, final_challengers=["mean"])
    trainer.guards = [guard]
    # The guard's comparison is the start's and the candidate's own scores on the guard examples.
    z = np.full(trainer.dim, 0.7)
    comparison = trainer._guard_comparisons(z)["other"]
    prompts = [format_prompt(trainer.tokenizer, guard.task, ex) for ex in guard.examples]
    completions = trainer.backend.evaluate(z[None], prompts)[0]
    direct = [guard.task.reward(c, ex) for c, ex in zip(completions, guard.examples)]
    assert comparison.n == 6 and comparison.mean_b == pytest.approx(np.mean(direct))
    # The start is scored on a guard set once, however many challengers are asked.
    import essa.trainer

    calls = []
    real_evaluate = essa.trainer.evaluate_split
    monkeypatch.setattr(essa.trainer, "evaluate_split", lambda *a: calls.append(1) or real_evaluate(*a))
    trainer._guard_comparisons(np.full(trainer.dim, -0.7))
    assert len(calls) == 1
    monkeypatch.undo()

    # A mean that wins on validation but loses on the guard set: the start is kept, and why is written.
    monkeypatch.setattr(EssaTrainer, "judgement_scores",
                        lambda self, z: np.ones(40) if np.any(z) else np.zeros(40))
    losing = compare_paired(np.ones(40), np.r_[np.zeros(20), np.ones(20)])
    monkeypatch.setattr(EssaTrainer, "_guard_comparisons", lambda self, z: {"other": losing})
    result = make_trainer(adapter_dir, tmp_path / "lose", 2, eval_every=0, final_challengers=["mean"],
                          guard_sets=["svamp"]).run()
    final = json.loads((tmp_path / "lose" / "final.json").read_text())
    assert final["choice"] == "start" and result.final_choice == "start"
    assert final["guard"]["mean"]["passed"] is False and final["guard"]["mean"]["other"]["delta"] == -0.5
    assert "guard set" in final["rule"]

    holding = compare_paired(np.ones(40), np.ones(40))
    monkeypatch.setattr(EssaTrainer, "_guard_comparisons", lambda self, z: {"other": holding})
    assert make_trainer(adapter_dir, tmp_path / "hold", 2, eval_every=0, final_challengers=["mean"],
                        guard_sets=["svamp"]).run().final_choice == "mean"
