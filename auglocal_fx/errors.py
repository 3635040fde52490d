"""The one exception type a user of auglocal-fx can cause."""

__all__ = ["AugLocalError"]


class AugLocalError(ValueError):
    """A problem with what the user asked for: the message says what is wrong and what to do.

    The CLI prints the message as a single line and exits non-zero; library callers can catch
    it as a ``ValueError``.
    """
