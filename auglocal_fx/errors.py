"""The one exception type a user of auglocal-fx can cause."""

from typing import Optional

__all__ = ["AugLocalError", "first_line"]


class AugLocalError(ValueError):
    """A problem with what the user asked for: the message says what is wrong and what to do.

    The CLI prints the message as a single line and exits non-zero; library callers can catch
    it as a ``ValueError``.
    """


def first_line(exc: BaseException, empty: Optional[str] = None, limit: Optional[int] = None) -> str:
    """The first line of ``exc``'s message, for a one-line error that quotes its cause.

    Args:
        exc: the exception.
        empty: what an empty message gives (default: the exception's type name).
        limit: cut the line to this many characters.
    """
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if empty is None else empty
    return text.splitlines()[0][:limit]
