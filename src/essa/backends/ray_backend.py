"""Ray-distributed population evaluation, following the paper's Algorithm 1.

N Ray actors each load the model, the SFT adapter (as an `SvdLoraSpace`) and the task once, and
each holds its own copy of the optimizer. Every worker regenerates a generation's candidates
itself from that shared optimizer state, so per generation only small scalars travel:

    driver -> worker: generation, candidate range, prompt indices, seed, and the fitness of the
                      generations the worker has not applied yet (normally just the previous one)
    worker -> driver: the chunk's fitness, reward failures, token count, a candidate fingerprint

Communication is O(popsize + prompts) per generation, independent of model and search-space
size. The driver optimizer (the trainer's) stays in lock-step: it asks the same candidates and
tells the same fitness. A worker that dies is replaced by a new actor, which catches up by
replaying the fitness history (or, after a resync, from the one state the driver shipped), and
its chunk is re-queued. Sampling seeds are per (generation, candidate, prompt), so a re-queued
chunk gives the same fitness on any worker, and the number of workers does not change it.

`evaluate(population, prompts, seed)` ships candidate rows instead; it serves validation, where
the population is one vector. Each worker builds its own backend (`backend.worker_engine`, local or
vllm) through the same registry as every other caller.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import pickle
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from essa.backends import (
    Backend,
    BackendInputs,
    Generation,
    Minibatch,
    backend_class,
    build_backend,
    half_means,
    load_inputs,
)
from essa.config import Config, TaskConfig
from essa.console import say
from essa.errors import EssaError, first_line
from essa.optim import Optimizer, mean_rate
from essa.tasks import RewardStats, Task

_log = logging.getLogger("essa.ray")


# --- messages ---------------------------------------------------------------------------------


@dataclass
class ChunkJob:
    """One chunk of one generation, as sent to a worker (no candidate vectors, no prompts)."""

    gen: int
    candidates: range
    prompt_indices: list[int]
    seed: int
    # (fitness, mean rate) of generations [gen - len(updates), gen) that this worker has not told yet.
    updates: list[tuple[np.ndarray, float]]
    # One-off: optimizer state at generation gen - len(updates) (after a resync or a replacement).
    reset_state: dict | None = None
    # The driver optimizer's initial step size: a worker builds its copy from it (essa.optim's
    # lock-step contract; with essa.sigma0 "auto" only the driver knows it).
    sigma0: float = 0.0


@dataclass
class ChunkResult:
    fitness: np.ndarray  # mean reward of each candidate of the chunk, in order
    half_fitness: np.ndarray  # (candidates, 2): mean reward on each half of the prompts
    reward_failures: int
    tokens: int  # completion tokens generated (re-tokenized text)
    fingerprint: str  # hash of the candidate rows the worker regenerated


def fingerprint(rows: np.ndarray) -> str:
    """A short hash of candidate rows: driver and workers must regenerate identical bits."""
    data = np.ascontiguousarray(rows, dtype=np.float64).tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


# --- the worker -------------------------------------------------------------------------------


class PopulationWorker:
    """Runs inside a Ray actor: a backend (model + SVD-LoRA space) + task + its own optimizer copy."""

    def __init__(self, cfg: Config, adapter_dir: str, alpha: float):
        from essa.tasks import get_task

        engine = cfg.backend.worker_engine
        inputs = load_inputs(cfg, adapter_dir, alpha, kind=engine)
        self.tokenizer, self.backend = inputs.tokenizer, build_backend(cfg, inputs, kind=engine)
        self.task = get_task(cfg.task)
        self.train = self.task.checked_split("train")
        self._prompts: dict[int, str] = {}
        self.search = cfg.essa
        self.optimizer: Optimizer | None = None  # built at the first job, as the driver's was
        self.gen = 0  # generations told so far
        self.population: np.ndarray | None = None  # asked candidates of generation self.gen

    def info(self) -> dict[str, Any]:
        return {"dim": self.backend.dim, "train_size": len(self.train), "pid": os.getpid()}

    def run_chunk(self, job: ChunkJob) -> ChunkResult:
        from essa.evaluate import score
        from essa.tasks import format_prompt

        self._catch_up(job)
        rows = self.population[job.candidates.start:job.candidates.stop]
        for i in job.prompt_indices:
            if i not in self._prompts:
                self._prompts[i] = format_prompt(self.tokenizer, self.task, self.train[i])
        examples = [self.train[i] for i in job.prompt_indices]
        completions = self.backend.evaluate(rows, [self._prompts[i] for i in job.prompt_indices], seed=job.seed,
                                            candidate_offset=job.candidates.start)
        stats = RewardStats()
        rewards = score(self.task, completions, examples, stats)
        return ChunkResult(rewards.mean(axis=1), half_means(rewards), stats.failures,
                           self._count_tokens(completions), fingerprint(rows))

    def evaluate(self, population: np.ndarray | None, prompts: list[str], seed: int, candidate_offset: int,
                 prompt_offset: int) -> list[list[str]]:
        return self.backend.evaluate(population, prompts, seed=seed, candidate_offset=candidate_offset,
                                     prompt_offset=prompt_offset)

    def _catch_up(self, job: ChunkJob) -> None:
        """Apply the same tell()s as the driver, then ask this generation's candidates once."""
        from essa.optim import make_optimizer

        start = job.gen - len(job.updates)
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.search, self.backend.dim, sigma0=job.sigma0)
        if job.reset_state is not None:
            self.optimizer.load_state_dict(job.reset_state)
            self.gen, self.population = start, None
        if self.gen != start:
            raise EssaError(f"worker is at generation {self.gen} but was sent updates from {start}")
        for fitness, rate in job.updates:
            population = self.population if self.population is not None else self.optimizer.ask()
            self.optimizer.tell(population, fitness, mean_rate=rate)
            self.gen, self.population = self.gen + 1, None
        if self.population is None:
            self.population = self.optimizer.ask()

    def _count_tokens(self, completions: list[list[str]]) -> int:
        texts = [t for row in completions for t in row]
        return sum(len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"])


# --- the driver -------------------------------------------------------------------------------


@dataclass
class _Slot:
    actor: Any
    told: int = 0  # generations this worker has applied (as far as the driver knows)
    needs_reset: bool = False  # next chunk carries the driver's base state
    starting: bool = False  # a replacement whose model may still be loading when its first chunk is sent


@dataclass
class _Work:
    """A unit of work for the dispatch queue; `call(slot)` builds its message when it is sent."""

    label: str
    call: Callable[[int], tuple[str, tuple]]
    done: Callable[[int], None] = lambda slot: None


class RayPopulationEvaluator(Backend):
    """Driver side of the distributed population: N workers, a chunk queue and fault tolerance.

    `run_generation` is the paper's protocol (workers regenerate candidates, only scalars
    travel); `evaluate` ships candidate rows. Settings: the `backend:` section (workers,
    ray_address, threads_per_worker, worker_engine), `essa:` (the optimizer every worker copies),
    and the model, task and decoding each worker loads.
    """

    loads_weights = True  # the workers load the model

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Ray is installed, and each worker runs a backend that works in one process."""
        _import_ray()
        engine = backend_class(cfg.backend.worker_engine)
        if issubclass(engine, RayPopulationEvaluator):
            raise EssaError(f"backend.worker_engine must be a backend that runs in one process, "
                            f"not {cfg.backend.worker_engine}")
        engine.check(cfg)

    @classmethod
    def evaluation_kind(cls, cfg: Config) -> str:
        return cfg.backend.worker_engine  # the pool is for training; single adapters evaluate here

    @classmethod
    def from_config(cls, cfg: Config, inputs: BackendInputs, progress: bool = False) -> RayPopulationEvaluator:
        if inputs.adapter_dir is None:
            raise EssaError("the Ray backend evaluates an adapter: set adapter=PATH")
        say(f"starting {cfg.backend.workers} Ray workers")
        return cls(cfg, inputs.adapter_dir, inputs.alpha, log=say)

    def __init__(self, cfg: Config, adapter_dir: str | Path, alpha: float, *,
                 log: Callable[[str], None] | None = None, chunk_size: int | None = None,
                 cpus_per_worker: float | None = None, max_retries: int = 3, startup_timeout_s: float = 600.0):
        self._ray = _import_ray()
        self.log = log or _log.info
        self.search = cfg.essa
        self.num_workers = cfg.backend.workers
        self.chunk_size = chunk_size or math.ceil(self.search.popsize / self.num_workers)
        self.max_retries = max_retries
        self.chunk_timeout_s = cfg.backend.chunk_timeout_s
        self.startup_timeout_s = startup_timeout_s
        cpus = cpus_per_worker or cfg.backend.threads_per_worker
        self._owns_ray = self._init_ray(cfg.backend.ray_address, self.num_workers * cpus)
        self._worker_args = (_worker_config(cfg), _absolute(str(adapter_dir)), alpha)
        self._actor_cls = self._ray.remote(num_cpus=cpus, max_restarts=0, max_task_retries=0)(PopulationWorker)
        self._slots = [_Slot(self._actor_cls.remote(*self._worker_args)) for _ in range(self.num_workers)]
        self._dim, self.train_size = self._check_workers(startup_timeout_s)
        # Lock-step bookkeeping: fitness of every generation since `_base`, whose starting
        # optimizer state is `_base_state` (None: a fresh optimizer built from `search`).
        self._driver: Optimizer | None = None
        self._next_gen = 0
        self._base, self._base_state = 0, None
        self._history: list[tuple[np.ndarray, float]] = []
        self._bytes = 0
        self.bytes_sent_last_generation = 0
        self.tokens_last_generation = 0
        self.replacements = 0

    # -- public --------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim  # as the workers report it

    def run_generation(self, gen: int, optimizer: Optimizer, task: Task, batch: Minibatch, seed: int,
                       stats: RewardStats) -> Generation:
        """Ask `optimizer` (the driver's) for generation `gen` and return its candidates and fitness.

        Only `batch.indices` travel: the workers hold the task and format its prompts themselves.
        The caller must then `optimizer.tell(population, fitness)` with exactly these values:
        the workers apply the same tell when the next generation's chunks reach them.
        """
        return self.run_indices(gen, optimizer, batch.indices, seed, stats)

    def run_indices(self, gen: int, optimizer: Optimizer, prompt_indices: Sequence[int], seed: int = 0,
                    stats: RewardStats | None = None) -> Generation:
        """`run_generation` from the train-split indices of the generation's prompts."""
        self._check_driver(optimizer, prompt_indices)
        if not self._in_lockstep(gen, optimizer):
            self._resync(gen, optimizer)
        population = optimizer.ask()
        self._bytes = 0
        prompts = [int(i) for i in prompt_indices]
        chunks = [range(lo, min(lo + self.chunk_size, self.search.popsize))
                  for lo in range(0, self.search.popsize, self.chunk_size)]
        work = [self._chunk_work(gen, c, prompts, seed, optimizer.sigma0) for c in chunks]
        self._next_gen = -1  # until this generation completes, lock-step is not guaranteed
        results = self._dispatch(work, f"generation {gen}")
        fitness = np.concatenate([r.fitness for r in results])
        for c, r in zip(chunks, results):
            if r.fingerprint != fingerprint(population[c.start:c.stop]):
                raise EssaError(f"generation {gen}: a worker regenerated candidates {c.start}-{c.stop - 1} "
                                "differently from the driver optimizer (out of sync: was the driver told other "
                                "fitness, or built from another SearchConfig than the workers?)")
        if stats is not None:
            stats.failures += sum(r.reward_failures for r in results)
        half_fitness = np.concatenate([r.half_fitness for r in results])
        # The driver tells this fitness with this mean rate (the lock-step contract, essa.optim).
        self._history.append((fitness, mean_rate(self.search, half_fitness)))
        self._driver, self._next_gen = optimizer, gen + 1
        self.bytes_sent_last_generation = self._bytes
        self.tokens_last_generation = sum(r.tokens for r in results)
        return Generation(population, fitness, half_fitness)

    def evaluate(self, population: np.ndarray | None, prompts: list[str], seed: int = 0,
                 candidate_offset: int = 0, prompt_offset: int = 0) -> list[list[str]]:
        """Completions[candidate][prompt], candidate rows shipped to the workers."""
        n_cand = 1 if population is None else len(population)
        out: list[list[str]] = [[""] * len(prompts) for _ in range(n_cand)]
        pieces = self._pieces(n_cand, len(prompts))
        work = []
        for cands, prs in pieces:
            rows = None if population is None else np.asarray(population[cands.start:cands.stop])
            args = (rows, prompts[prs.start:prs.stop], seed, candidate_offset + cands.start,
                    prompt_offset + prs.start)
            work.append(_Work(f"rows {cands.start}-{cands.stop - 1} x prompts {prs.start}-{prs.stop - 1}",
                              lambda slot, a=args: ("evaluate", a)))
        for (cands, prs), texts in zip(pieces, self._dispatch(work, "evaluation")):
            for c, row in zip(cands, texts):
                out[c][prs.start:prs.stop] = row
        return out

    def actor(self, index: int) -> Any:
        """The Ray actor handle of worker `index` (e.g. to inspect or kill it)."""
        return self._slots[index].actor

    def close(self) -> None:
        if self._ray.is_initialized():
            for slot in self._slots:
                self._ray.kill(slot.actor, no_restart=True)
        self._slots = []
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RayPopulationEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lock-step ----------------------------------------------------------------------------
    def _check_driver(self, optimizer: Optimizer, prompt_indices: Sequence[int]) -> None:
        if (optimizer.dim, optimizer.popsize) != (self.dim, self.search.popsize):
            raise EssaError(f"the driver optimizer has (dim, popsize) = {(optimizer.dim, optimizer.popsize)}, "
                            f"the workers' = {(self.dim, self.search.popsize)}")
        bad = [i for i in prompt_indices if not 0 <= int(i) < self.train_size]
        if bad:
            raise EssaError(f"prompt indices {bad[:5]} are outside the train split (size {self.train_size})")

    def _in_lockstep(self, gen: int, optimizer: Optimizer) -> bool:
        if self._driver is None and self._next_gen == 0:
            # A fresh driver and the workers both come from make_optimizer; fingerprints verify.
            return gen == 0
        return optimizer is self._driver and gen == self._next_gen

    def _resync(self, gen: int, optimizer: Optimizer) -> None:
        """Adopt the driver's current (pre-ask) state: shipped once to each worker, then scalars again."""
        self._base, self._base_state, self._history = gen, optimizer.state_dict(), []
        for slot in self._slots:
            slot.told, slot.needs_reset = gen, True
        self.log(f"ray: workers resync to the driver optimizer at generation {gen} "
                 f"(one-off state of {_size(self._base_state)} bytes per worker)")

    def _chunk_work(self, gen: int, cands: range, prompts: list[int], seed: int, sigma0: float) -> _Work:
        def call(i: int) -> tuple[str, tuple]:
            slot = self._slots[i]
            updates = self._history[slot.told - self._base:gen - self._base]
            reset = self._base_state if slot.needs_reset else None
            return "run_chunk", (ChunkJob(gen, cands, prompts, seed, updates, reset, sigma0),)

        def done(i: int) -> None:
            self._slots[i].told, self._slots[i].needs_reset = gen, False

        return _Work(f"candidates {cands.start}-{cands.stop - 1}", call, done)

    # -- dispatch and fault tolerance ----------------------------------------------------------
    def _dispatch(self, work: list[_Work], what: str) -> list[Any]:
        """Run every item on some idle worker. A worker that dies, or sends nothing back within
        backend.chunk_timeout_s (hung), is replaced and its item re-queued."""
        ray = self._ray
        queue, idle = deque(range(len(work))), deque(range(len(self._slots)))
        running: dict[Any, tuple[int, int, float]] = {}  # result ref -> (slot, item, deadline)
        results: list[Any] = [None] * len(work)
        attempts: Counter[int] = Counter()

        def retry(slot: int, item: int, why: str, exc: BaseException | None = None) -> None:
            attempts[item] += 1
            if attempts[item] > self.max_retries:
                raise EssaError(f"{what}: {work[item].label} lost its worker {attempts[item]} times; "
                                f"giving up ({why})") from exc
            self._replace(slot, f"{what}: worker {slot} {why}; re-queued {work[item].label}")
            queue.appendleft(item)
            idle.append(slot)

        while queue or running:
            while queue and idle:
                slot, item = idle.popleft(), queue.popleft()
                method, args = work[item].call(slot)
                self._bytes += _size(args)
                ref = getattr(self._slots[slot].actor, method).remote(*args)
                running[ref] = (slot, item, self._deadline(self._slots[slot]))
            ready, _ = ray.wait(list(running), num_returns=1, timeout=_seconds_until(running))
            if not ready:  # a deadline passed: those workers are hung (alive, but silent)
                now = time.monotonic()
                for ref, (slot, item, deadline) in list(running.items()):
                    if now >= deadline:
                        del running[ref]
                        retry(slot, item, f"sent nothing back within backend.chunk_timeout_s="
                                          f"{self.chunk_timeout_s:g} s (hung)")
                continue
            slot, item, _ = running.pop(ready[0])
            try:
                value = ray.get(ready[0])
            except _worker_lost_errors(ray) as exc:
                retry(slot, item, f"lost ({type(exc).__name__}: {first_line(exc)})", exc)
                continue
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None) or exc
                raise EssaError(f"{what}: a worker failed on {work[item].label}: "
                                f"{type(cause).__name__}: {first_line(cause)}") from exc
            self._bytes += _size(value)
            self._slots[slot].starting = False
            work[item].done(slot)
            results[item] = value
            idle.append(slot)
        return results

    def _deadline(self, slot: _Slot) -> float:
        """When a chunk sent to `slot` now counts as hung; a replacement first gets time to start."""
        if self.chunk_timeout_s is None:
            return math.inf
        return time.monotonic() + self.chunk_timeout_s + (self.startup_timeout_s if slot.starting else 0.0)

    def _replace(self, index: int, why: str) -> None:
        """A fresh actor in the slot; it catches up from the base state and the fitness history."""
        self._ray.kill(self._slots[index].actor, no_restart=True)
        fresh = self._base_state is None  # a new worker starts at generation 0 of `search`
        self._slots[index] = _Slot(self._actor_cls.remote(*self._worker_args),
                                   told=0 if fresh else self._base, needs_reset=not fresh, starting=True)
        self.replacements += 1
        self.log(f"ray: {why}; started a replacement worker that replays "
                 f"{len(self._history)} generation(s) of fitness")

    # -- setup ---------------------------------------------------------------------------------
    def _init_ray(self, address: str | None, cpus: float) -> bool:
        if self._ray.is_initialized():
            return False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            kwargs["num_cpus"] = max(os.cpu_count() or 1, math.ceil(cpus))
        else:
            kwargs["address"] = address
        try:
            self._ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - connection/startup problems: one clear line
            raise EssaError(f"could not start or reach Ray ({address or 'local'}): {first_line(exc)}") from exc
        return True

    def _check_workers(self, timeout_s: float) -> tuple[int, int]:
        ray = self._ray
        try:
            infos = ray.get([s.actor.info.remote() for s in self._slots], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            self.close()
            raise EssaError(f"Ray workers did not start within {timeout_s:.0f} s: does the cluster have "
                            f"{self.num_workers} x the CPUs each worker asks for?") from exc
        except ray.exceptions.RayError as exc:
            self.close()
            cause = getattr(exc, "cause", None) or exc
            raise EssaError(f"a Ray worker failed to start: {first_line(cause)}") from exc
        if len({(i["dim"], i["train_size"]) for i in infos}) != 1:
            self.close()
            raise EssaError("Ray workers disagree on the search space or the task: check paths on every node")
        self.log(f"ray: {len(infos)} workers ready (pids {[i['pid'] for i in infos]}, dim {infos[0]['dim']})")
        return infos[0]["dim"], infos[0]["train_size"]

    def _pieces(self, n_cand: int, n_prompts: int) -> list[tuple[range, range]]:
        """Split the (candidate x prompt) grid into about one piece per worker."""
        n = self.num_workers
        if n_cand >= n or n_prompts < 2:
            step = math.ceil(n_cand / n)
            return [(range(lo, min(lo + step, n_cand)), range(n_prompts)) for lo in range(0, n_cand, step)]
        step = math.ceil(n_prompts / n)
        return [(range(n_cand), range(lo, min(lo + step, n_prompts))) for lo in range(0, n_prompts, step)]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise EssaError("backend.kind=ray needs Ray: pip install 'essa[ray]' (ray>=2.40)") from exc
    return ray


def _worker_lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    e = ray.exceptions
    return (e.RayActorError, e.WorkerCrashedError, e.ObjectLostError, e.NodeDiedError, e.OutOfMemoryError)


def _seconds_until(running: dict[Any, tuple[int, int, float]]) -> float | None:
    """How long `ray.wait` may block before the earliest deadline (None: no deadline)."""
    first = min(deadline for _, _, deadline in running.values())
    return None if first == math.inf else max(0.0, first - time.monotonic())


def _size(obj: Any) -> int:
    return len(pickle.dumps(obj, protocol=5))



def _absolute(path: str) -> str:
    # Workers may run in another directory: pass local paths absolute.
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def _worker_config(cfg: Config) -> Config:
    """The config a worker runs: local paths absolute (workers may run in another directory) and
    its own thread count."""
    model = dataclasses.replace(cfg.model, name=_absolute(cfg.model.name), threads=cfg.backend.threads_per_worker)
    return cfg.with_changes(model=model, task=_absolute_task(cfg.task))


def _absolute_task(task: TaskConfig) -> TaskConfig:
    target, sep, attr = task.name.rpartition(":")
    if sep and target.endswith(".py"):
        return dataclasses.replace(task, name=f"{_absolute(target)}:{attr}")
    return task


__all__ = ["ChunkJob", "ChunkResult", "PopulationWorker", "RayPopulationEvaluator", "fingerprint"]
