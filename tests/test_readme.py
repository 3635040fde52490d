"""The README's set-up commands are the ones CI runs."""

import os

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_ci_runs_the_readme_commands():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read().splitlines()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read().splitlines()
    marked = [line.split("# README: ", 1)[1] for line in ci if line.startswith("# README: ")]
    assert len(marked) == 2
    for command in marked:
        assert command in ci, f".ci/run does not run: {command}"
        assert command in readme, f"README.md does not show: {command}"
