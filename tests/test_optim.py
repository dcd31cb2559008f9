"""Ask/tell optimizers: they optimize, reproduce per seed, resume exactly, and reject bad input."""

from __future__ import annotations

import re

import cma
import numpy as np
import pytest

from essa.config import SearchConfig
from essa.errors import EssaError
from essa.io import atomic_write_state, read_state
from essa.optim import make_optimizer, optimizer_names

KINDS = optimizer_names()

DIM, POP = 10, 16
TARGET = np.random.default_rng(1).normal(0.0, 0.5, DIM)


def sphere(x: np.ndarray) -> np.ndarray:
    return -np.sum((x - TARGET) ** 2, axis=-1)


def make(kind: str, seed: int = 0, dim: int = DIM, popsize: int = POP):
    # Mirrored sampling (the default of cma and sep-cma) pairs candidates: odd sizes run unmirrored.
    options = {"lr": 0.05} if kind == "openai-es" else {"mirrored": popsize % 2 == 0}
    search = SearchConfig(optimizer=kind, optimizer_options=options, popsize=popsize, sigma0=0.3, seed=seed)
    return make_optimizer(search, dim)


def run(opt, generations: int, fitness=sphere) -> list[np.ndarray]:
    asked = []
    for _ in range(generations):
        x = opt.ask()
        asked.append(x)
        opt.tell(x, fitness(x))
    return asked


@pytest.mark.parametrize("kind", KINDS)
def test_improves_sphere(kind):
    opt = make(kind)
    np.testing.assert_array_equal(opt.mean, np.zeros(DIM))
    start = -sphere(opt.mean)
    run(opt, 40)
    assert -sphere(opt.mean) < 0.1 * start


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("popsize", [2, 7, 16])
def test_ask_shape_and_dtype(kind, popsize):
    x = make(kind, popsize=popsize).ask()
    assert x.shape == (popsize, DIM)
    assert x.dtype == np.float64
    assert np.all(np.isfinite(x))


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_asks_despite_global_numpy_use(kind):
    a, b = make(kind, seed=3), make(kind, seed=3)
    for gen in range(5):
        np.random.seed(gen)  # other code reseeding and drawing from the global state
        xa = a.ask()
        np.random.rand(17)
        xb = b.ask()
        np.testing.assert_array_equal(xa, xb)
        a.tell(xa, sphere(xa))
        np.random.randn(3)
        b.tell(xb, sphere(xb))
        np.testing.assert_array_equal(a.mean, b.mean)
    assert not np.array_equal(make(kind, seed=3).ask(), make(kind, seed=4).ask())


@pytest.mark.parametrize("kind", KINDS)
def test_leaves_global_numpy_state_alone(kind):
    np.random.seed(123)
    before = np.random.get_state()
    opt = make(kind)
    run(opt, 3)
    after = np.random.get_state()
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2:] == after[2:]


@pytest.mark.parametrize("kind", KINDS)
def test_exact_resume_through_a_state_file(kind, tmp_path):
    total, split = 12, 5
    straight = make(kind, seed=7)
    head = run(straight, split)
    atomic_write_state(tmp_path / "state.npz", straight.state_dict())  # plain data, no pickle
    state = read_state(tmp_path / "state.npz")
    tail = run(straight, total - split)  # must not disturb the saved state

    resumed = make(kind, seed=99)  # a different seed: the loaded state must win
    resumed.load_state_dict(state)
    tail_resumed = run(resumed, total - split)

    assert len(head) == split
    for x, y in zip(tail, tail_resumed):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(straight.mean, resumed.mean)
    assert straight.sigma == resumed.sigma


@pytest.mark.parametrize("kind", KINDS)
def test_workers_regenerate_candidates_from_shared_state(kind):
    leader = make(kind, seed=5)
    run(leader, 3)
    shared = leader.state_dict()
    workers = [make(kind, seed=i) for i in range(2)]
    for w in workers:
        w.load_state_dict(shared)
    x = leader.ask()
    fitness = sphere(x)
    leader.tell(x, fitness)
    for w in workers:
        xw = w.ask()
        np.testing.assert_array_equal(xw, x)
        w.tell(xw, fitness)  # every worker applies the same update from gathered fitness
        np.testing.assert_array_equal(w.mean, leader.mean)


@pytest.mark.parametrize("kind", KINDS)
def test_update_depends_only_on_fitness_ranks(kind):
    a, b = make(kind, seed=2), make(kind, seed=2)
    run(a, 4, fitness=sphere)
    run(b, 4, fitness=lambda x: np.exp(sphere(x)) * 5.0 + 1.0)  # same order, other scale
    np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=1e-12)


def test_sep_cma_covariance_is_diagonal():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    hessian = q @ np.diag([1.0, 10.0, 1e2, 1e3, 1e4]) @ q.T

    def rotated_ellipsoid(x):
        d = x - 1.0
        return -np.einsum("ij,jk,ik->i", d, hessian, d)

    full, sep = make("cma", dim=5, popsize=10), make("sep-cma", dim=5, popsize=10)
    run(full, 60, rotated_ellipsoid)
    run(sep, 60, rotated_ellipsoid)

    assert sep._es.opts["CMA_diagonal"] is True
    assert not isinstance(sep._es.sm, cma.sampler.GaussFullSampler)
    assert np.ptp(sep._es.sigma_vec.scaling) > 0  # per-coordinate variances did adapt
    assert isinstance(full._es.sm, cma.sampler.GaussFullSampler)
    off_diagonal = full._es.C - np.diag(np.diag(full._es.C))
    assert np.abs(off_diagonal).max() > 1e-3


def test_cma_keeps_asking_after_pycma_would_stop():
    opt = make("cma", dim=3, popsize=4)
    for _ in range(500):
        x = opt.ask()
        opt.tell(x, np.zeros(4))  # flat fitness trips pycma's termination criteria
        if opt._es.stop():
            break
    assert opt._es.stop()
    for _ in range(5):
        x = opt.ask()
        assert x.shape == (4, 3) and np.all(np.isfinite(x))
        opt.tell(x, sphere(np.pad(x, ((0, 0), (0, DIM - 3)))))


@pytest.mark.parametrize("popsize", [6, 7])
def test_openai_es_samples_are_mirrored(popsize):
    opt = make("openai-es", popsize=popsize)
    run(opt, 2)
    noise = opt.ask() - opt.mean
    half = popsize // 2
    np.testing.assert_allclose(noise[:half], -noise[(popsize + 1) // 2 :][:half], atol=1e-12)
    assert opt.sigma == 0.3  # fixed step size


def test_openai_es_ties_share_ranks():
    opt = make("openai-es", popsize=8)
    x = opt.ask()
    opt.tell(x, np.ones(8))  # flat rewards carry no direction
    np.testing.assert_array_equal(opt.mean, np.zeros(DIM))
    x = opt.ask()
    f = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    opt.tell(x, f)
    win = x[f == 1].mean(axis=0)
    assert np.dot(opt.mean, win - x.mean(axis=0)) > 0  # moves towards the rewarded samples


@pytest.mark.parametrize("settings, message", [
    ({"optimizer": "adam"}, "essa.optimizer must be one of cma, sep-cma, openai-es"),
    ({"optimizer": "openai-es", "popsize": 1}, "essa.popsize"),
    ({"sigma0": 0.0}, "essa.sigma0"),
    ({"seed": -1}, "essa.seed"),
    ({"optimizer": "openai-es", "optimizer_options": {"lr": 0}}, "essa.optimizer_options.lr must be > 0"),
    ({"optimizer": "openai-es", "optimizer_options": {"beta": 1}}, "essa.optimizer_options.beta"),
    ({"optimizer": "cma", "optimizer_options": {"lr": 0.1}}, "optimizer cma takes cmean, mirrored"),
    ({"optimizer": "sep-cma", "optimizer_options": {"cmean": 0}}, "essa.optimizer_options.cmean must be in (0, 1]"),
    ({"optimizer": "sep-cma", "popsize": 5, "optimizer_options": {"mirrored": True}}, "essa.popsize must be even for mirrored sampling"),
    ({"sigma0": "big"}, 'essa.sigma0 must be > 0 or "auto"'),
])
def test_invalid_search_settings_name_their_key(settings, message):
    with pytest.raises(EssaError, match=re.escape(message)):
        SearchConfig(**settings)


def test_openai_es_options_reach_the_optimizer():
    opt = make_optimizer(SearchConfig(optimizer="openai-es", optimizer_options={"lr": 0.3}), DIM)
    assert opt.lr == 0.3


@pytest.mark.parametrize("kind", KINDS)
def test_tell_rejects_bad_shapes_and_values(kind):
    opt = make(kind)
    x = opt.ask()
    f = sphere(x)
    with pytest.raises(EssaError, match="candidates"):
        opt.tell(x[:-1], f[:-1])
    with pytest.raises(EssaError, match="candidates"):
        opt.tell(x[:, :-1], f)
    with pytest.raises(EssaError, match="fitness"):
        opt.tell(x, f[:-1])
    with pytest.raises(EssaError, match="fitness"):
        opt.tell(x, f[:, None])
    with pytest.raises(EssaError, match="NaN"):
        opt.tell(x, np.where(np.arange(POP) == 0, np.nan, f))
    np.testing.assert_array_equal(opt.mean, np.zeros(DIM))  # rejected tells changed nothing


@pytest.mark.parametrize("kind", ["cma", "sep-cma"])
def test_cma_tell_needs_a_preceding_ask(kind):
    opt = make(kind)
    x = np.zeros((POP, DIM))
    with pytest.raises(EssaError, match="ask"):
        opt.tell(x, sphere(x))
    x = opt.ask()
    opt.tell(x, sphere(x))
    with pytest.raises(EssaError, match="ask"):
        opt.tell(x, sphere(x))


@pytest.mark.parametrize("kind", KINDS)
def test_load_state_rejects_mismatched_optimizer(kind):
    other = "openai-es" if kind != "openai-es" else "cma"
    with pytest.raises(EssaError, match="state"):
        make(kind).load_state_dict(make(other).state_dict())
    with pytest.raises(EssaError, match="state"):
        make(kind, dim=DIM + 1).load_state_dict(make(kind).state_dict())


def test_mean_rate_is_the_share_of_fitness_variance_both_halves_agree_on():
    from essa.optim import MIN_MEAN_RATE, mean_rate

    signal = SearchConfig(mean_step="signal")
    agreeing = np.array([[0.1, 0.1], [0.5, 0.5], [0.9, 0.9], [0.3, 0.3]])
    assert mean_rate(signal, agreeing) == 1.0
    # Halves that disagree as much as they agree: (h1 + h2) and (h1 - h2) have the same spread.
    disagreeing = np.array([[0.5, 0.0], [0.0, 0.5], [0.5, 0.5], [0.0, 0.0]])
    assert mean_rate(signal, disagreeing) == MIN_MEAN_RATE
    # Sums 0.8 / 0.2 (variance 0.09), differences +-0.1 (variance 0.01): 1 - 0.01 / 0.09.
    partly = np.array([[0.45, 0.35], [0.05, 0.15], [0.45, 0.35], [0.05, 0.15]])
    assert mean_rate(signal, partly) == pytest.approx(1 - 0.01 / 0.09)
    assert mean_rate(signal, np.full((4, 2), 0.25)) == MIN_MEAN_RATE  # all tied
    assert mean_rate(SearchConfig(), disagreeing) == 1.0  # mean_step full: the optimizer's own step
    assert mean_rate(signal, None) == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_mean_rate_scales_the_mean_step_and_leaves_the_step_size_adaptation(kind):
    full, slow = make(kind, seed=5), make(kind, seed=5)
    start = full.mean
    population = full.ask()
    assert np.array_equal(population, slow.ask())
    full.tell(population, sphere(population))
    slow.tell(population, sphere(population), mean_rate=0.001)
    assert np.allclose(slow.mean - start, 0.001 * (full.mean - start))
    assert np.linalg.norm(full.mean - start) > 0
    if kind != "openai-es":  # pycma adapts sigma from the intended step, whatever part of it was taken
        assert slow.sigma == pytest.approx(full.sigma, rel=1e-9)
    with pytest.raises(EssaError, match="mean_rate must be in"):
        population = slow.ask()
        slow.tell(population, sphere(population), mean_rate=0.0)


def test_signal_mean_step_drifts_less_on_pure_noise_fitness(monkeypatch):
    """benchmarks/noise_drift.py in small: coin-flip fitness that no candidate changes."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from noise_drift import run_case

    full = run_case(0.1, 0.0, "full", seeds=12, generations=20, prompts=32)
    signal = run_case(0.1, 0.0, "signal", seeds=12, generations=20, prompts=32)
    assert signal["norm_median"] < 0.6 * full["norm_median"]
    assert signal["sigma_median"] <= SearchConfig().sigma0 and full["sigma_median"] <= SearchConfig().sigma0
