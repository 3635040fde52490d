"""``auglocal-fx``: the click group; each subcommand lives in its own module."""

import atexit
import gc
import os
import sys
import threading
import warnings

# Importing torch makes about 10^6 objects, all kept to the end, and no garbage: collecting
# cycles meanwhile only re-scans them. They are frozen (left out of later collections) and the
# collector is back on once the commands are imported.
gc.disable()
try:
    import click

    from auglocal_fx import __version__

    from .analyze import analyze
    from .blocks import blocks
    from .convert import convert
    from .report import report
    from .train import train
finally:
    gc.freeze()
    gc.enable()
# At exit Python collects every object it has not frozen once more, just before freeing them
# all: over a second of CPU for `convert` with timm. Freeze them instead.
atexit.register(gc.freeze)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="auglocal-fx")
def cli() -> None:
    """Turn any PyTorch ConvNet into an AugLocal local-learning network."""
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the CLI shows errors: one line, without the library's source line."""
    return f"Warning: {' '.join(str(message).split())}\n"


def main() -> None:
    """The ``auglocal-fx`` console script: the command group, then a quick exit.

    Python's teardown after a command (modules and interpreter state torch and timm filled) took
    0.3-0.4 s here even with the objects frozen at exit, and the process ends anyway. So the
    exit functions run and the output is flushed, as at a normal exit, and the process ends
    with ``os._exit``. With a non-daemon thread still running, the exit is the normal one, which
    waits for the thread.
    """
    try:
        cli.main(prog_name="auglocal-fx")
        code: object = 0
    except SystemExit as stop:
        code = stop.code
    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit's rule: anything else is printed, status 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing to save
            pass
    os._exit(code)


cli.add_command(convert)
cli.add_command(report)
cli.add_command(blocks)
cli.add_command(train)
cli.add_command(analyze)
