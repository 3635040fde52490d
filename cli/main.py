"""``auglocal-fx``: the click group; each subcommand lives in its own module."""

import atexit
import gc
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


cli.add_command(convert)
cli.add_command(report)
cli.add_command(blocks)
cli.add_command(train)
cli.add_command(analyze)
