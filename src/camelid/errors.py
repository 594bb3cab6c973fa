"""The one exception type that means "the user asked for something we cannot do"."""


class CamelidError(Exception):
    """A user mistake or an unsupported input: the CLI prints the message as one line and exits non-zero.

    The message names the problem and, where there is one, the fix or the supported choices.
    """


def shown(value, limit: int = 60) -> str:
    """A value read from an untrusted file (a tensor name, a metadata value), fit for a one-line error: quoted with
    its control characters escaped, and cut to about `limit` characters (it may be a whole vocabulary)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
