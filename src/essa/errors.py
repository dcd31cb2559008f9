"""The one exception type that reaches users as a clear one-line message."""


class EssaError(Exception):
    """A user-facing error: bad config, bad input, missing file. The CLI prints it in one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
