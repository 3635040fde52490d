"""Package discovery (the rest of the metadata is in pyproject.toml).

Every package under ``auglocal_fx/`` and ``cli/`` is found, so a new subpackage cannot be left
out of a wheel; ``cli/`` is installed as ``auglocal_fx_cli`` (the design keeps it at the top of
the repository, beside ``auglocal_fx/``).
"""

from setuptools import find_packages, setup

CLI_PACKAGE, CLI_DIR = "auglocal_fx_cli", "cli"

setup(
    packages=find_packages(include=["auglocal_fx", "auglocal_fx.*"])
    + [CLI_PACKAGE] + [f"{CLI_PACKAGE}.{name}" for name in find_packages(where=CLI_DIR)],
    package_dir={CLI_PACKAGE: CLI_DIR},
)
