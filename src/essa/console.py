"""Progress lines for the person at the terminal: `[essa] ...` on stderr, mirrored to the log."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("essa")


def say(message: str, prefix: str = "essa") -> None:
    print(f"[{prefix}] {message}", file=sys.stderr, flush=True)
    log.info(message)
