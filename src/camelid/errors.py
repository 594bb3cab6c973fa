"""The one exception type that means "the user asked for something we cannot do"."""


class CamelidError(Exception):
    """A user mistake or an unsupported input: the CLI prints the message as one line and exits non-zero.

    The message names the problem and, where there is one, the fix or the supported choices.
    """
