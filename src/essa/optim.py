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
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import cma
import numpy as np

from essa.errors import EssaError

if TYPE_CHECKING:
    from essa.config import SearchConfig


@dataclass
class NoOptions:
    """The `essa.optimizer_options` of an optimizer that takes none."""


class Optimizer(ABC):
    """A search distribution over offset vectors; `tell` takes fitness where higher is better.

    Built as `cls(dim, popsize, sigma0, seed, options)`, where `options` is an instance of the
    class's `Options` dataclass (the checked `essa.optimizer_options`).
    """

    kind: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    dim: int
    popsize: int
    sigma0: float  # the initial step size (set by make_optimizer)

    @abstractmethod
    def ask(self) -> np.ndarray:
        """Return `(popsize, dim)` float64 candidates."""

    @abstractmethod
    def tell(self, candidates: np.ndarray, fitness: np.ndarray, mean_rate: float = 1.0) -> None:
        """Update the distribution from candidates and their fitness (higher is better);
        `mean_rate` in (0, 1] scales how far the mean moves (essa.mean_step, `mean_rate`)."""

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


@dataclass
class CmaOptions:
    """`essa.optimizer_options` of cma and sep-cma."""

    # Learning rate of the mean (pycma's CMA_cmean). Below 1 the mean moves a fraction of the
    # selected step: with noisy fitness it drifts less far from a good start per generation.
    cmean: float = 1.0
    # Mirrored sampling: candidates come in pairs m + s and m - s (pycma's unconditional mirrors).
    # Shared prompts then cancel whatever both halves of a pair have in common (on by default:
    # the measured setting, docs/BENCHMARKS.md).
    mirrored: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.cmean <= 1:
            raise EssaError(f"essa.optimizer_options.cmean must be in (0, 1] (got {self.cmean!r})")
        if not isinstance(self.mirrored, bool):
            raise EssaError(f"essa.optimizer_options.mirrored must be true or false (got {self.mirrored!r})")


def _global_randn(*shape: int) -> np.ndarray:
    """pycma's sampler. A module-level function pickles by name; pycma's default,
    `np.random.randn`, would pickle a detached copy of the global RandomState."""
    return np.random.randn(*shape)


class CmaEsOptimizer(Optimizer):
    """CMA-ES via pycma (full covariance).

    Not thread-safe: ask/tell briefly swap numpy's global random state (see `_own_global_rng`).
    """

    kind = "cma"
    Options = CmaOptions
    diagonal = False

    def __init__(self, dim: int, popsize: int, sigma0: float, seed: int, options: CmaOptions):
        if options.mirrored and popsize % 2:
            raise EssaError(f"mirrored sampling needs an even essa.popsize (got {popsize})")
        self.dim, self.popsize = dim, popsize
        # pycma samples from numpy's global RandomState (also for stochastic rounding of mirrors),
        # so this optimizer keeps a private copy of that state and swaps it in around each call.
        self._np_state = np.random.RandomState(seed).get_state(legacy=False)
        cma_options = {
            "popsize": popsize,
            "seed": np.nan,  # NaN: pycma does not reseed the global state; we seeded ours above
            "randn": _global_randn,
            "CMA_diagonal": self.diagonal,
            "CMA_cmean": options.cmean,
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,  # no output files
        }
        if options.mirrored:  # every second candidate mirrors the one before it
            cma_options.update(CMA_mirrors=popsize // 2, CMA_mirrormethod=0)
        with self._own_global_rng():
            self._es = cma.CMAEvolutionStrategy(np.zeros(dim), sigma0, cma_options)

    @contextmanager
    def _own_global_rng(self) -> Iterator[None]:
        outside = np.random.get_state()
        np.random.set_state(self._np_state)
        try:
            yield
        finally:
            self._np_state = np.random.get_state(legacy=False)
            np.random.set_state(outside)

    def ask(self) -> np.ndarray:
        # pycma's termination criteria (tolfun, tolx, ...) are ignored on purpose: the trainer
        # owns the generation budget, and ask() keeps sampling regardless of es.stop().
        with self._own_global_rng():
            solutions = self._es.ask()
        return np.array(solutions, dtype=np.float64)

    def tell(self, candidates: np.ndarray, fitness: np.ndarray, mean_rate: float = 1.0) -> None:
        candidates, fitness = self._check_tell(candidates, fitness)
        if getattr(self._es, "_flgtelldone", False):  # pycma raises a bare RuntimeError here
            raise EssaError("tell: each generation must be one ask() followed by one tell()")
        # pycma's mean learning rate (CMA_cmean) for this one step. pycma divides the mean's step by
        # it when it updates its evolution paths, so step size and covariance adapt as they would.
        cmean = self._es.sp.cmean
        self._es.sp.cmean = cmean * _checked_rate(mean_rate)
        try:
            with self._own_global_rng():
                self._es.tell(list(candidates), list(-fitness))  # pycma minimizes
        finally:
            self._es.sp.cmean = cmean

    @property
    def mean(self) -> np.ndarray:
        return np.array(self._es.mean, dtype=np.float64)

    @property
    def sigma(self) -> float:
        return float(self._es.sigma)

    def state_dict(self) -> dict:
        """Plain data: pycma's strategy object pickled into a byte array, which `load_state_dict`
        reads back through an unpickler that only rebuilds numpy arrays and pycma's classes."""
        es = pickle.dumps(self._es, protocol=pickle.HIGHEST_PROTOCOL)
        return {
            "kind": self.kind,
            "dim": self.dim,
            "popsize": self.popsize,
            "es": np.frombuffer(es, dtype=np.uint8).copy(),
            "np_random_state": copy.deepcopy(self._np_state),
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, self.kind)
        self._es = _load_cma_strategy(np.asarray(state["es"], dtype=np.uint8).tobytes())
        self._np_state = copy.deepcopy(state["np_random_state"])


class SepCmaEsOptimizer(CmaEsOptimizer):
    """Separable CMA-ES: a diagonal covariance, linear cost in `dim`."""

    kind = "sep-cma"
    diagonal = True


# What a pickled pycma strategy may name: numpy's array reconstructors, plain containers, pycma's
# classes and the few functions pycma keeps in its options. Anything else (os.system, eval, ...)
# is refused, so a tampered checkpoint cannot run code while it is read.
_NUMPY_GLOBALS = {"dtype", "ndarray", "_reconstruct", "scalar", "_frombuffer"}
_PLAIN_GLOBALS = {("builtins", name) for name in ("range", "slice", "set", "frozenset", "complex", "bytearray")}
_PLAIN_GLOBALS |= {("collections", "OrderedDict"), ("collections", "deque")}
_PLAIN_GLOBALS |= {("cma.evolution_strategy", "_pass"), ("cma.options_parameters", "is_feasible"),
                   ("numpy.linalg", "eigh"), (__name__, "_global_randn")}


class _CmaUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        numpy_module = module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray",
                                  "numpy.core.numeric", "numpy._core.numeric")
        if (numpy_module and name in _NUMPY_GLOBALS) or (module, name) in _PLAIN_GLOBALS:
            return super().find_class(module, name)
        if module == "cma" or module.startswith("cma."):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in an optimizer state")


def _load_cma_strategy(data: bytes) -> cma.CMAEvolutionStrategy:
    import io

    try:
        es = _CmaUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - a corrupt or tampered state: one clear line
        raise EssaError(f"optimizer state is not a CMA-ES state this version can read: {exc}") from exc
    if not isinstance(es, cma.CMAEvolutionStrategy):
        raise EssaError(f"optimizer state holds a {type(es).__name__}, not a CMA-ES strategy")
    return es


@dataclass
class OpenAiEsOptions:
    # Adam learning rate on the mean.
    lr: float = 0.02

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise EssaError(f"essa.optimizer_options.lr must be > 0 (got {self.lr!r})")


class OpenAiEsOptimizer(Optimizer):
    """OpenAI-ES: antithetic Gaussian samples at fixed sigma, centered ranks, Adam on the mean."""

    kind = "openai-es"
    Options = OpenAiEsOptions
    betas = (0.9, 0.999)  # Adam's usual moment decays
    eps = 1e-8

    def __init__(self, dim: int, popsize: int, sigma0: float, seed: int, options: OpenAiEsOptions):
        self.dim, self.popsize = dim, popsize
        self.lr = options.lr
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

    def tell(self, candidates: np.ndarray, fitness: np.ndarray, mean_rate: float = 1.0) -> None:
        candidates, fitness = self._check_tell(candidates, fitness)
        # Recover the noise from the candidates, so any process holding them can apply the update.
        noise = (candidates - self._mean) / self._sigma
        grad = _centered_ranks(fitness) @ noise / (self.popsize * self._sigma)
        self._adam_ascent(grad, _checked_rate(mean_rate))

    def _adam_ascent(self, grad: np.ndarray, rate: float = 1.0) -> None:
        b1, b2 = self.betas
        self._step += 1
        self._adam_m = b1 * self._adam_m + (1 - b1) * grad
        self._adam_v = b2 * self._adam_v + (1 - b2) * grad**2
        m_hat = self._adam_m / (1 - b1**self._step)
        v_hat = self._adam_v / (1 - b2**self._step)
        self._mean = self._mean + rate * self.lr * m_hat / (np.sqrt(v_hat) + self.eps)

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


def _checked_rate(rate: float) -> float:
    if not 0 < rate <= 1:
        raise EssaError(f"tell: mean_rate must be in (0, 1] (got {rate!r})")
    return float(rate)


# The smallest mean rate: pycma divides by it, so it stays above zero.
MIN_MEAN_RATE = 1e-3


def mean_rate(search: SearchConfig, half_fitness: np.ndarray | None) -> float:
    """How far a generation's tell moves the mean (essa.mean_step). "full": 1. "signal": the share
    of the candidates' fitness variance that the two halves of the prompts agree on,
    1 - var(h1 - h2) / var(h1 + h2): about 0 when the fitness is noise (the halves disagree as much
    as they agree), near 1 when the candidates truly differ. Part of the lock-step contract below:
    Ray workers apply it from the same half fitness."""
    if search.mean_step == "full" or half_fitness is None:
        return 1.0
    halves = np.asarray(half_fitness, dtype=np.float64)
    agree, disagree = np.var(halves.sum(axis=1)), np.var(halves[:, 0] - halves[:, 1])
    if agree <= 0:
        return MIN_MEAN_RATE  # every candidate scored the same: nothing to move toward
    return float(np.clip(1.0 - disagree / agree, MIN_MEAN_RATE, 1.0))


def _centered_ranks(values: np.ndarray) -> np.ndarray:
    """Map values to ranks spread evenly over [-0.5, 0.5]: robust to the scale of rewards.

    Ties share their average rank, so equal rewards (common with 0/1 task rewards) push nowhere.
    """
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    ranks = (first + (counts - 1) / 2)[inverse]
    return ranks / (len(values) - 1) - 0.5


# The optimizer registry: `essa.optimizer` names one of these.
_OPTIMIZERS: dict[str, type[Optimizer]] = {
    "cma": CmaEsOptimizer,
    "sep-cma": SepCmaEsOptimizer,
    "openai-es": OpenAiEsOptimizer,
}


def register_optimizer(name: str, cls: type[Optimizer]) -> None:
    """Make an `Optimizer` subclass available as `essa.optimizer: NAME`."""
    _OPTIMIZERS[name] = cls


def optimizer_names() -> list[str]:
    return list(_OPTIMIZERS)


def check_optimizer_options(name: str, options: dict[str, Any]) -> Any:
    """`essa.optimizer_options` as the optimizer's own `Options` dataclass, keys and values checked."""
    from essa.config import build_section

    cls = _OPTIMIZERS[name].Options
    known = [f.name for f in fields(cls)]
    for key in options:
        if key not in known:
            raise EssaError(f"unknown config key 'essa.optimizer_options.{key}': optimizer {name} takes "
                            + (f"{', '.join(known)}" if known else "no options"))
    return build_section(cls, options, "essa.optimizer_options.")


# -- the lock-step contract ---------------------------------------------------------------------
# Ray workers each hold a copy of the trainer's optimizer (essa.backends.ray_backend) and stay in
# lock-step with it by asking and telling the same values, so every copy must start from the same
# state. It does because a run's optimizer is only ever built here, from (the essa settings, the
# search dimension, the initial step size): the trainer calls `make_optimizer` (a new run, a
# resumed one) and each worker calls it with the step size the driver's optimizer reports, which
# every ChunkJob carries. Each step tells the generation's fitness with `mean_rate` of its half
# fitness, which the workers compute from the same numbers. A change to how a run's optimizer starts
# (another initial mean, a warm
# start) belongs in this function's arguments, so the workers receive it too; a state reached any
# other way has to travel to them whole (the evaluator's resync). tests/test_ray_backend.py checks
# that a worker regenerates the candidates the trainer's optimizer asks.
def make_optimizer(search: SearchConfig, dim: int, sigma0: float | None = None) -> Optimizer:
    """The optimizer `search` names, its initial mean the zero offset vector, seeded by essa.seed;
    `sigma0` replaces `search.sigma0` (which may be "auto", resolved by the caller)."""
    sigma0 = search.sigma0 if sigma0 is None else sigma0
    if isinstance(sigma0, str):
        raise EssaError(f"essa.sigma0={sigma0!r} must be resolved to a number before an optimizer is built")
    cls = _OPTIMIZERS[search.optimizer]
    optimizer = cls(dim, search.popsize, sigma0, search.seed,
                    check_optimizer_options(search.optimizer, search.optimizer_options))
    optimizer.sigma0 = float(sigma0)
    return optimizer


__all__ = ["CmaEsOptimizer", "OpenAiEsOptimizer", "Optimizer", "SepCmaEsOptimizer", "make_optimizer",
           "optimizer_names", "register_optimizer"]
