"""errors.first_line: the one way a one-line error quotes its cause."""

from auglocal_fx.errors import first_line


def test_first_line():
    assert first_line(ValueError("  shape mismatch\n  at layer 3")) == "shape mismatch"
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(KeyError(), "") == ""
    assert first_line(OSError("x" * 300), limit=120) == "x" * 120
