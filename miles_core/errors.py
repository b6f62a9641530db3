"""One exception type for user mistakes.

A bad path, a bad config, a checkpoint of an unknown architecture, a malformed prompt file: each
raises `MilesError` with a message that says what to fix. The CLI prints it as one line and exits
non-zero. Bugs stay ordinary exceptions with their tracebacks.
"""


class MilesError(Exception):
    """A user-facing error: the message alone must tell the user what is wrong and what to do."""


class TransientError(Exception):
    """A failure worth retrying (a flaky file system, a lost worker); pipeline tasks retry it with backoff."""
