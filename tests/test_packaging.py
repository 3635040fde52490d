"""What ships works: a wheel built from the repository imports and runs on its own.

The README installs with ``pip install -e``, whose finder maps the checkout and so hides a
subpackage missing from the wheel (``auglocal_fx.rules`` once was). This test builds the wheel
offline, unpacks it into an empty folder and imports every module from there, in a Python that
sees neither the checkout nor the editable finder.
"""

import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

# Module fixtures (the built wheel) are built once per process: under
# `pytest -n`, these tests stay on one worker.
pytestmark = pytest.mark.xdist_group("packaging")

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "auglocal_fx", "cli")
PACKAGES = ("auglocal_fx", "auglocal_fx_cli")

# Runs with ``python -S``: no site processing, so no ``.pth`` file (the editable finder is one)
# is read; the dependencies' folder is appended as a plain path and the wheel's folder comes first.
IMPORT_EVERYTHING = textwrap.dedent("""
    import configparser, importlib, pathlib, sys
    wheel_dir, deps = sys.argv[1], sys.argv[2]
    sys.path[:] = [wheel_dir] + [p for p in sys.path if p and "site-packages" not in p] + [deps]
    root = pathlib.Path(wheel_dir)
    names = sorted(".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                   for top in {packages!r} for p in (root / top).rglob("*.py"))
    for name in names:
        module = importlib.import_module(name)
        if not module.__file__.startswith(wheel_dir):
            sys.exit(f"{{name}} was imported from {{module.__file__}}, not from the wheel")
    print("imported", len(names), "modules")
    entry_points = configparser.ConfigParser()
    entry_points.read(next(root.glob("*.dist-info")) / "entry_points.txt")
    target = entry_points["console_scripts"]["auglocal-fx"]
    module_name, func = target.split(":")
    sys.argv = ["auglocal-fx", "--help"]
    getattr(importlib.import_module(module_name), func)()
""").format(packages=PACKAGES)


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    """The wheel built from a copy of the sources, unpacked into an empty folder."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if not path.exists():  # setup.py is optional to setuptools
            continue
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(work / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (work / "dist").glob("auglocal_fx-*.whl")
    unpacked = work / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    return unpacked


def test_wheel_holds_every_package_of_the_source(wheel_dir):
    installed_as = {"auglocal_fx": "auglocal_fx", "cli": "auglocal_fx_cli"}
    expected = {"/".join((installed_as[top],) + p.parent.relative_to(ROOT / top).parts)
                for top in installed_as for p in (ROOT / top).rglob("__init__.py")}
    shipped = {p.parent.relative_to(wheel_dir).as_posix() for p in wheel_dir.rglob("__init__.py")}
    assert expected <= shipped, f"missing from the wheel: {sorted(expected - shipped)}"


def test_wheel_imports_every_module_and_runs_the_cli(wheel_dir):
    deps = sysconfig.get_paths()["purelib"]
    result = subprocess.run([sys.executable, "-S", "-c", IMPORT_EVERYTHING, str(wheel_dir), deps],
                            capture_output=True, text=True, timeout=300, cwd=wheel_dir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "imported" in result.stdout
    assert "Usage: auglocal-fx" in result.stdout and "convert" in result.stdout
