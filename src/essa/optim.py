"""Ask/tell evolution strategies over the offset vector: CMA-ES (full or separable) and OpenAI-ES.

Every optimizer maximizes fitness and owns its randomness, so two optimizers with the same
seed, or one rebuilt from `state_dict()` in another process, propose bit-identical candidates.
That is what lets distributed workers regenerate a generation's candidates from shared state.
"""

from __future__ import annotations

import copy
import pickle
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterator

import cma
import numpy as np

from essa.errors import EssaError

KINDS = ("cma", "sep-cma", "openai-es")


class Optimizer(ABC):
    """A search distribution over offset vectors; `tell` takes fitness where higher is better."""

    dim: int
    popsize: int

    @abstractmethod
    def ask(self) -> np.ndarray:
        """Return `(popsize, dim)` float64 candidates."""

    @abstractmethod
    def tell(self, candidates: np.ndarray, fitness: np.ndarray) -> None:
        """Update the distribution from candidates and their fitness (higher is better)."""

    @property
    @abstractmethod
    def mean(self) -> np.ndarray: ...

    @property
    @abstractmethod
    def sigma(self) -> float: ...

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def _check_tell(self, candidates, fitness) -> tuple[np.ndarray, np.ndarray]:
        candidates = np.asarray(candidates, dtype=np.float64)
        fitness = np.asarray(fitness, dtype=np.float64)
        expected = (self.popsize, self.dim)
        if candidates.shape != expected:
            raise EssaError(f"tell: candidates have shape {candidates.shape}, expected {expected}")
        if fitness.shape != (self.popsize,):
            raise EssaError(f"tell: fitness has shape {fitness.shape}, expected {(self.popsize,)}")
        if not np.all(np.isfinite(fitness)):
            raise EssaError("tell: fitness contains NaN or infinite values")
        return candidates, fitness

    def _check_state(self, state: dict, kind: str) -> None:
        got = (state.get("kind"), state.get("dim"), state.get("popsize"))
        if got != (kind, self.dim, self.popsize):
            raise EssaError(
                f"optimizer state is for (kind, dim, popsize) = {got}, "
                f"this optimizer is {(kind, self.dim, self.popsize)}"
            )


def _global_randn(*shape: int) -> np.ndarray:
    """pycma's sampler. A module-level function pickles by name; pycma's default,
    `np.random.randn`, would pickle a detached copy of the global RandomState."""
    return np.random.randn(*shape)


class CmaEsOptimizer(Optimizer):
    """CMA-ES via pycma; `diagonal=True` gives separable CMA-ES (linear cost in `dim`).

    Not thread-safe: ask/tell briefly swap numpy's global random state (see `_own_global_rng`).
    """

    def __init__(self, dim: int, popsize: int, sigma0: float, seed: int, diagonal: bool = False):
        self.dim, self.popsize, self.diagonal = dim, popsize, diagonal
        self.kind = "sep-cma" if diagonal else "cma"
        # pycma samples from numpy's global RandomState (also for stochastic rounding of mirrors),
        # so this optimizer keeps a private copy of that state and swaps it in around each call.
        self._np_state = np.random.RandomState(seed).get_state()
        options = {
            "popsize": popsize,
            "seed": np.nan,  # NaN: pycma does not reseed the global state; we seeded ours above
            "randn": _global_randn,
            "CMA_diagonal": diagonal,
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,  # no output files
        }
        with self._own_global_rng():
            self._es = cma.CMAEvolutionStrategy(np.zeros(dim), sigma0, options)

    @contextmanager
    def _own_global_rng(self) -> Iterator[None]:
        outside = np.random.get_state()
        np.random.set_state(self._np_state)
        try:
            yield
        finally:
            self._np_state = np.random.get_state()
            np.random.set_state(outside)

    def ask(self) -> np.ndarray:
        # pycma's termination criteria (tolfun, tolx, ...) are ignored on purpose: the trainer
        # owns the generation budget, and ask() keeps sampling regardless of es.stop().
        with self._own_global_rng():
            solutions = self._es.ask()
        return np.array(solutions, dtype=np.float64)

    def tell(self, candidates: np.ndarray, fitness: np.ndarray) -> None:
        candidates, fitness = self._check_tell(candidates, fitness)
        if getattr(self._es, "_flgtelldone", False):  # pycma raises a bare RuntimeError here
            raise EssaError("tell: each generation must be one ask() followed by one tell()")
        with self._own_global_rng():
            self._es.tell(list(candidates), list(-fitness))  # pycma minimizes

    @property
    def mean(self) -> np.ndarray:
        return np.array(self._es.mean, dtype=np.float64)

    @property
    def sigma(self) -> float:
        return float(self._es.sigma)

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "popsize": self.popsize,
            "es": pickle.dumps(self._es, protocol=pickle.HIGHEST_PROTOCOL),
            "np_random_state": copy.deepcopy(self._np_state),
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, self.kind)
        self._es = pickle.loads(state["es"])
        self._np_state = copy.deepcopy(state["np_random_state"])


class OpenAiEsOptimizer(Optimizer):
    """OpenAI-ES: antithetic Gaussian samples at fixed sigma, centered ranks, Adam on the mean."""

    def __init__(self, dim: int, popsize: int, sigma0: float, seed: int, lr: float = 0.02,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.dim, self.popsize, self.kind = dim, popsize, "openai-es"
        self.lr, self.betas, self.eps = lr, betas, eps
        self._sigma = float(sigma0)
        self._mean = np.zeros(dim)
        self._adam_m = np.zeros(dim)
        self._adam_v = np.zeros(dim)
        self._step = 0
        self._rng = np.random.default_rng(seed)

    def ask(self) -> np.ndarray:
        # An odd population drops the mirror of the last sample.
        half = self._rng.standard_normal(((self.popsize + 1) // 2, self.dim))
        noise = np.concatenate([half, -half])[: self.popsize]
        return self._mean + self._sigma * noise

    def tell(self, candidates: np.ndarray, fitness: np.ndarray) -> None:
        candidates, fitness = self._check_tell(candidates, fitness)
        # Recover the noise from the candidates, so any process holding them can apply the update.
        noise = (candidates - self._mean) / self._sigma
        grad = _centered_ranks(fitness) @ noise / (self.popsize * self._sigma)
        self._adam_ascent(grad)

    def _adam_ascent(self, grad: np.ndarray) -> None:
        b1, b2 = self.betas
        self._step += 1
        self._adam_m = b1 * self._adam_m + (1 - b1) * grad
        self._adam_v = b2 * self._adam_v + (1 - b2) * grad**2
        m_hat = self._adam_m / (1 - b1**self._step)
        v_hat = self._adam_v / (1 - b2**self._step)
        self._mean = self._mean + self.lr * m_hat / (np.sqrt(v_hat) + self.eps)

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def sigma(self) -> float:
        return self._sigma

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "popsize": self.popsize,
            "mean": self._mean.copy(),
            "sigma": self._sigma,
            "lr": self.lr,
            "adam_m": self._adam_m.copy(),
            "adam_v": self._adam_v.copy(),
            "step": self._step,
            "rng": copy.deepcopy(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, self.kind)
        self._mean = np.array(state["mean"], dtype=np.float64)
        self._sigma = float(state["sigma"])
        self.lr = float(state["lr"])
        self._adam_m = np.array(state["adam_m"], dtype=np.float64)
        self._adam_v = np.array(state["adam_v"], dtype=np.float64)
        self._step = int(state["step"])
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])


def _centered_ranks(values: np.ndarray) -> np.ndarray:
    """Map values to ranks spread evenly over [-0.5, 0.5]: robust to the scale of rewards.

    Ties share their average rank, so equal rewards (common with 0/1 task rewards) push nowhere.
    """
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    ranks = (first + (counts - 1) / 2)[inverse]
    return ranks / (len(values) - 1) - 0.5


def make_optimizer(kind: str, dim: int, popsize: int, sigma0: float, seed: int,
                   lr: float = 0.02) -> Optimizer:
    """Build an optimizer whose initial mean is the zero offset vector; `lr` is for openai-es."""
    if kind not in KINDS:
        raise EssaError(f"unknown optimizer {kind!r}; choose one of {', '.join(KINDS)}")
    if dim < 1:
        raise EssaError(f"optimizer dimension must be >= 1, got {dim}")
    if popsize < 2:
        raise EssaError(f"optimizer popsize must be >= 2, got {popsize}")
    if not sigma0 > 0:
        raise EssaError(f"optimizer sigma0 must be > 0, got {sigma0}")
    if not 0 <= seed < 2**32:
        raise EssaError(f"optimizer seed must be in [0, 2**32), got {seed}")
    if kind == "openai-es":
        if not lr > 0:
            raise EssaError(f"openai-es lr must be > 0, got {lr}")
        return OpenAiEsOptimizer(dim, popsize, sigma0, seed, lr=lr)
    return CmaEsOptimizer(dim, popsize, sigma0, seed, diagonal=(kind == "sep-cma"))


__all__ = ["KINDS", "CmaEsOptimizer", "OpenAiEsOptimizer", "Optimizer", "make_optimizer"]
