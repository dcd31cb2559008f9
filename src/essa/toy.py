"""The paper's toy experiment (Appendix E) on scikit-learn's 8x8 digits: no LLM needed.

A softmax classifier (64 features x 10 classes) is pretrained on digits 0-5 only. A rank-r
LoRA-like delta dW = B A is then fitted by SGD on a few samples of the new digits 6-9 (the "SFT
delta"). Each factor is SVD-decomposed separately (A = U_A diag(s_A) V_A^T, B likewise), the
singular vectors are frozen, and only the 2r singular values are optimized on the training split
of all ten digits, by CMA-ES (fitness from forward passes only) or by plain SGD. The frozen
vectors come either from the SFT delta or from random Gaussian factors of the same shape, given
the SFT delta's singular values so that both start from the same point in the search space.

Choices the paper leaves open: ES and SGD see the same minibatch sequence (one minibatch per ES
generation, shared by all candidates); the ES fitness is the minibatch's negative cross-entropy
(accuracy is an option; it gives no signal from a start with 0% on the new digits); the reported
ES model is the CMA-ES mean; SFT uses 40 samples of 6-9 plus 20 replayed samples of 0-5.
Everything is numpy; the model is small enough that a whole population is one batched product.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import cma
import numpy as np

from essa.errors import EssaError

N_CLASSES = 10
OLD_DIGITS = (0, 1, 2, 3, 4, 5)
NEW_DIGITS = (6, 7, 8, 9)
METHODS = ("ES", "SGD")
VECTORS = ("SFT", "random")


@dataclass
class ToyConfig:
    rank: int = 5
    popsize: int = 24
    # Minibatch per ES generation (shared by all candidates) and per SGD step.
    batch_size: int = 64
    sgd_lr: float = 0.1
    # ES generations = SGD steps, so both see the same number of minibatches.
    steps: int = 500
    seeds: tuple[int, ...] = tuple(range(10))
    # SFT data: samples of digits 6-9, plus `n_sft_replay` of digits 0-5 against forgetting.
    n_sft_samples: int = 40
    n_sft_replay: int = 20
    # SGD epochs on the factors: a deliberately short warm start that leaves room to improve.
    sft_epochs: int = 20
    sft_lr: float = 0.5
    # ES fitness on the minibatch: "neg_ce" (negative cross-entropy) or "accuracy".
    es_fitness: str = "neg_ce"
    # CMA-ES initial step size, as a fraction of the RMS of the starting singular values.
    es_sigma_rel: float = 0.3
    eval_every: int = 25
    test_fraction: float = 0.4

    def validate(self) -> ToyConfig:
        checks = [
            (1 <= self.rank <= N_CLASSES, f"rank must be in 1..{N_CLASSES}"),
            (self.popsize >= 2, "popsize must be >= 2"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.sgd_lr > 0, "sgd_lr must be > 0"),
            (self.steps >= 1, "steps must be >= 1"),
            (len(self.seeds) >= 1, "seeds must not be empty"),
            (self.n_sft_samples >= 1, "n_sft_samples must be >= 1"),
            (self.n_sft_replay >= 0, "n_sft_replay must be >= 0"),
            (self.es_fitness in ("neg_ce", "accuracy"), "es_fitness must be neg_ce or accuracy"),
            (self.es_sigma_rel > 0, "es_sigma_rel must be > 0"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (0.0 < self.test_fraction < 1.0, "test_fraction must be in (0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise EssaError(f"toy config: {message}")
        return self


@dataclass
class ToyRow:
    """One cell of the paper's table, mean and std over seeds (accuracies in [0, 1])."""

    method: str
    vectors: str
    new_before: float
    all_before: float
    new_final: float
    new_final_std: float
    all_final: float
    all_final_std: float


@dataclass
class ToyCurve:
    """Mean held-out accuracy over seeds at each evaluated step (step 0 = before optimizing)."""

    steps: list[int]
    new_acc: list[float]
    all_acc: list[float]


@dataclass
class ToyResult:
    config: ToyConfig
    rows: list[ToyRow]
    curves: dict[str, ToyCurve]  # key "ES/SFT", "SGD/random", ...
    # Reference points (means over seeds): pretrained classifier and pretrained + SFT delta.
    pretrained_new: float
    pretrained_all: float
    sft_new: float
    sft_all: float
    wall_clock_s: float = 0.0

    def row(self, method: str, vectors: str) -> ToyRow:
        for r in self.rows:
            if r.method == method and r.vectors == vectors:
                return r
        raise EssaError(f"no toy result for {method}/{vectors}")

    def summary(self) -> dict[str, Any]:
        """Flat numbers for one JSON line: final held-out 6-9 accuracy per cell, and context."""
        out: dict[str, Any] = {}
        for r in self.rows:
            key = f"{r.method.lower()}_{r.vectors.lower()}"
            out[key] = round(r.new_final, 4)
            out[f"{key}_std"] = round(r.new_final_std, 4)
            out[f"{key}_all"] = round(r.all_final, 4)
        out.update(
            pretrained_new=round(self.pretrained_new, 4),
            pretrained_all=round(self.pretrained_all, 4),
            sft_new=round(self.sft_new, 4),
            sft_all=round(self.sft_all, 4),
            wall_clock_s=round(self.wall_clock_s, 2),
            config=dataclasses.asdict(self.config),
        )
        return out


# ---------------------------------------------------------------- data and base model


@dataclass
class _Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _load_digits(seed: int, test_fraction: float) -> _Data:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise EssaError("the toy experiment needs scikit-learn: pip install scikit-learn") from exc

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float64) / 16.0
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(N_CLASSES):  # stratified, so every digit is in both splits
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(test_fraction * len(idx)))]] = True
    return _Data(x[~test], y[~test], x[test], y[test])


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _pretrain(
    x: np.ndarray, y: np.ndarray, steps: int = 300, lr: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch gradient descent on the 10-way softmax with only digits 0-5 present."""
    w = np.zeros((N_CLASSES, x.shape[1]))
    b = np.zeros(N_CLASSES)
    onehot = np.eye(N_CLASSES)[y]
    for _ in range(steps):
        g = (_softmax(x @ w.T + b) - onehot) / len(y)
        w -= lr * (g.T @ x + 1e-3 * w)
        b -= lr * g.sum(axis=0)
    return w, b


def _train_lora(
    x: np.ndarray,
    y: np.ndarray,
    base: np.ndarray,
    rank: int,
    cfg: ToyConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """SGD on the factors of dW = B A (LoRA init: A Gaussian, B zero); returns (A, B)."""
    a = rng.normal(0.0, 1.0 / math.sqrt(x.shape[1]), size=(rank, x.shape[1]))
    b = np.zeros((N_CLASSES, rank))
    onehot = np.eye(N_CLASSES)[y]
    for _ in range(cfg.sft_epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), cfg.batch_size):
            i = order[start : start + cfg.batch_size]
            g = (_softmax(base[i] + x[i] @ (b @ a).T) - onehot[i]) / len(i)
            g_dw = g.T @ x[i]  # gradient w.r.t. dW, 10 x features
            a, b = a - cfg.sft_lr * (b.T @ g_dw), b - cfg.sft_lr * (g_dw @ a.T)
    return a, b


# ---------------------------------------------------------------- the singular-value space


@dataclass
class SingularSpace:
    """dW(s) = U_B diag(s_B) (V_B^T U_A) diag(s_A) V_A^T with frozen vectors; s = [s_A, s_B]."""

    v_a: np.ndarray  # features x r
    mid: np.ndarray  # r x r, V_B^T U_A
    u_b: np.ndarray  # classes x r
    s0: np.ndarray  # starting singular values [s_A, s_B], length 2r

    @classmethod
    def from_factors(cls, a: np.ndarray, b: np.ndarray) -> SingularSpace:
        u_a, s_a, vt_a = np.linalg.svd(a, full_matrices=False)
        u_b, s_b, vt_b = np.linalg.svd(b, full_matrices=False)
        return cls(vt_a.T, vt_b @ u_a, u_b, np.concatenate([s_a, s_b]))

    @property
    def rank(self) -> int:
        return self.mid.shape[0]

    def delta_logits(self, z: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Adapter logits for projected inputs z = x V_A (n x r) and s of shape (..., 2r)."""
        r = self.rank
        s = np.asarray(s)
        h = (z * s[..., None, :r]) @ self.mid.T
        return (h * s[..., None, r:]) @ self.u_b.T

    def grad(
        self, z: np.ndarray, base: np.ndarray, y: np.ndarray, s: np.ndarray
    ) -> tuple[float, np.ndarray]:
        """Mean cross-entropy and its gradient w.r.t. s, by hand (the chain is four products)."""
        r = self.rank
        h1 = z * s[:r]
        h2 = h1 @ self.mid.T
        logits = base + (h2 * s[r:]) @ self.u_b.T
        logp = _log_softmax(logits)
        loss = -float(logp[np.arange(len(y)), y].mean())
        g = np.exp(logp)
        g[np.arange(len(y)), y] -= 1.0
        g /= len(y)
        d_h3 = g @ self.u_b
        d_sb = (d_h3 * h2).sum(axis=0)
        d_sa = (((d_h3 * s[r:]) @ self.mid) * z).sum(axis=0)
        return loss, np.concatenate([d_sa, d_sb])


def _random_space(
    like: SingularSpace,
    shape_a: tuple[int, ...],
    shape_b: tuple[int, ...],
    rng: np.random.Generator,
) -> SingularSpace:
    """Vectors of random Gaussian factors, started at the SFT delta's singular values."""
    space = SingularSpace.from_factors(rng.normal(size=shape_a), rng.normal(size=shape_b))
    return dataclasses.replace(space, s0=like.s0.copy())


# ---------------------------------------------------------------- the two optimizers


def _fitness(logits: np.ndarray, y: np.ndarray, kind: str) -> np.ndarray:
    """Per-candidate fitness (higher is better) for logits of shape (P, n, classes)."""
    if kind == "accuracy":
        return (logits.argmax(axis=-1) == y).mean(axis=-1)
    return _log_softmax(logits)[..., np.arange(len(y)), y].mean(axis=-1)


class _Evaluator:
    """Held-out accuracy (new digits, all digits) of the classifier with singular values s."""

    def __init__(self, space: SingularSpace, data: _Data, base_test: np.ndarray) -> None:
        self.space = space
        self.z = data.x_test @ space.v_a
        self.base = base_test
        self.y = data.y_test
        self.new = np.isin(data.y_test, NEW_DIGITS)

    def __call__(self, s: np.ndarray) -> tuple[float, float]:
        correct = (self.base + self.space.delta_logits(self.z, s)).argmax(axis=-1) == self.y
        return float(correct[self.new].mean()), float(correct.mean())


_Curve = list[tuple[int, float, float]]  # (step, held-out 6-9 accuracy, held-out 0-9 accuracy)


def _minibatches(n: int, cfg: ToyConfig, seed: int) -> list[np.ndarray]:
    """The same minibatch sequence for ES and SGD, so the comparison is data-for-data."""
    rng = np.random.default_rng(seed + 1000)
    return [rng.choice(n, size=min(cfg.batch_size, n), replace=False) for _ in range(cfg.steps)]


# One training step on a minibatch (z, base logits, labels); returns the singular values to report.
_Update = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _run(
    method: str,
    space: SingularSpace,
    data: _Data,
    base_train: np.ndarray,
    evaluate: _Evaluator,
    cfg: ToyConfig,
    seed: int,
) -> _Curve:
    """Held-out accuracy of one method at step 0, every `eval_every` steps and at the end."""
    update = _es_update(space, cfg, seed) if method == "ES" else _sgd_update(space, cfg)
    z_train = data.x_train @ space.v_a
    curve = [(0, *evaluate(space.s0))]
    for step, i in enumerate(_minibatches(len(data.y_train), cfg, seed), start=1):
        s = update(z_train[i], base_train[i], data.y_train[i])
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append((step, *evaluate(s)))
    return curve


def _es_update(space: SingularSpace, cfg: ToyConfig, seed: int) -> _Update:
    """One CMA-ES generation per minibatch, all candidates on the same minibatch."""
    sigma0 = cfg.es_sigma_rel * float(np.sqrt(np.mean(space.s0**2)))
    opts = {"popsize": cfg.popsize, "seed": seed + 1, "verbose": -9}
    es = cma.CMAEvolutionStrategy(space.s0.copy(), sigma0, opts)

    def update(z: np.ndarray, base: np.ndarray, y: np.ndarray) -> np.ndarray:
        cands = np.asarray(es.ask())
        fitness = _fitness(base + space.delta_logits(z, cands), y, cfg.es_fitness)
        es.tell(list(cands), list(-fitness))  # cma minimizes
        return es.mean  # the CMA mean is the model we report

    return update


def _sgd_update(space: SingularSpace, cfg: ToyConfig) -> _Update:
    """One plain SGD step on the singular values per minibatch."""
    s = space.s0.copy()

    def update(z: np.ndarray, base: np.ndarray, y: np.ndarray) -> np.ndarray:
        nonlocal s
        _, g = space.grad(z, base, y, s)
        s = s - cfg.sgd_lr * g
        return s

    return update


# ---------------------------------------------------------------- one seed, then the table


def _sft_indices(old: np.ndarray, cfg: ToyConfig, rng: np.random.Generator) -> np.ndarray:
    new_idx, old_idx = np.flatnonzero(~old), np.flatnonzero(old)
    if cfg.n_sft_samples > len(new_idx) or cfg.n_sft_replay > len(old_idx):
        raise EssaError(
            f"toy config: at most {len(new_idx)} SFT samples of 6-9 and "
            f"{len(old_idx)} replay samples of 0-5 exist"
        )
    return np.concatenate(
        [
            rng.choice(new_idx, cfg.n_sft_samples, replace=False),
            rng.choice(old_idx, cfg.n_sft_replay, replace=False),
        ]
    )


def _run_seed(cfg: ToyConfig, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    data = _load_digits(seed, cfg.test_fraction)
    old = np.isin(data.y_train, OLD_DIGITS)
    w, b = _pretrain(data.x_train[old], data.y_train[old])
    base_train = data.x_train @ w.T + b
    base_test = data.x_test @ w.T + b

    sft = _sft_indices(old, cfg, rng)
    a, b_fac = _train_lora(
        data.x_train[sft], data.y_train[sft], base_train[sft], cfg.rank, cfg, rng
    )

    spaces = {"SFT": SingularSpace.from_factors(a, b_fac)}
    spaces["random"] = _random_space(spaces["SFT"], a.shape, b_fac.shape, rng)
    pre_correct = base_test.argmax(axis=-1) == data.y_test
    new_test = np.isin(data.y_test, NEW_DIGITS)
    out: dict[str, Any] = {
        "pretrained": (float(pre_correct[new_test].mean()), float(pre_correct.mean())),
        "sft": _Evaluator(spaces["SFT"], data, base_test)(spaces["SFT"].s0),
    }
    for vectors, space in spaces.items():
        evaluate = _Evaluator(space, data, base_test)
        for method in METHODS:
            out[f"{method}/{vectors}"] = _run(method, space, data, base_train, evaluate, cfg, seed)
    return out


def run_toy(config: ToyConfig) -> ToyResult:
    """Run every (method, vectors) cell for every seed; means and stds (ddof 0) over seeds."""
    cfg = config.validate()
    start = time.perf_counter()
    per_seed = [_run_seed(cfg, seed) for seed in cfg.seeds]
    rows, curves = [], {}
    for method in METHODS:
        for vectors in VECTORS:
            key = f"{method}/{vectors}"
            arr = np.array([s[key] for s in per_seed])  # seeds x evals x (step, new, all)
            new, acc = arr[:, :, 1], arr[:, :, 2]
            curves[key] = ToyCurve(
                arr[0, :, 0].astype(int).tolist(), new.mean(0).tolist(), acc.mean(0).tolist()
            )
            rows.append(
                ToyRow(
                    method,
                    vectors,
                    new_before=float(new[:, 0].mean()),
                    all_before=float(acc[:, 0].mean()),
                    new_final=float(new[:, -1].mean()),
                    new_final_std=float(new[:, -1].std()),
                    all_final=float(acc[:, -1].mean()),
                    all_final_std=float(acc[:, -1].std()),
                )
            )
    pre = np.mean([s["pretrained"] for s in per_seed], axis=0)
    sft = np.mean([s["sft"] for s in per_seed], axis=0)
    return ToyResult(
        cfg,
        rows,
        curves,
        pretrained_new=float(pre[0]),
        pretrained_all=float(pre[1]),
        sft_new=float(sft[0]),
        sft_all=float(sft[1]),
        wall_clock_s=time.perf_counter() - start,
    )


def format_table(result: ToyResult) -> str:
    """The paper's table as Markdown: held-out accuracy (%) before and after optimizing."""

    def pct(v: float) -> str:
        return f"{100 * v:.1f}"

    cfg = result.config
    lines = [
        f"Held-out accuracy (%), mean +- std over {len(cfg.seeds)} seed(s); {cfg.steps} steps "
        f"(ES generations of {cfg.popsize} candidates / SGD steps at lr {cfg.sgd_lr}), "
        f"minibatch {cfg.batch_size}, rank {cfg.rank} ({2 * cfg.rank} singular values).",
        f"Pretrained on 0-5: digits 6-9 {pct(result.pretrained_new)}, "
        f"all {pct(result.pretrained_all)}. Plus SFT delta: digits 6-9 {pct(result.sft_new)}, "
        f"all {pct(result.sft_all)}.",
        "",
        "| method | singular vectors | 6-9 before | 6-9 after | 0-9 before | 0-9 after |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result.rows:
        lines.append(
            f"| {r.method} | {r.vectors} | {pct(r.new_before)} "
            f"| {pct(r.new_final)} +- {pct(r.new_final_std)} "
            f"| {pct(r.all_before)} | {pct(r.all_final)} +- {pct(r.all_final_std)} |"
        )
    return "\n".join(lines)
