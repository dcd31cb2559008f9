"""The one exception type that reaches users as a clear one-line message."""


class EssaError(Exception):
    """A user-facing error: bad config, bad input, missing file. The CLI prints it in one line."""
