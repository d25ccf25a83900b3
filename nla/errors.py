"""One exception type for mistakes a user can fix; the CLI prints it as one line, not a traceback."""


class NLAError(RuntimeError):
    """A user-facing error: the message says what is wrong and what to do."""
