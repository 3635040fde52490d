"""The README is the landing page: CI runs its set-up commands, and its links lead somewhere."""

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")
# A markdown link's target: relative, outside code spans (the README quotes none in code).
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def readme_links():
    """The README's relative link targets, as ``(path, anchor)``; ``anchor`` may be ``""``."""
    targets = [t for t in LINK.findall(_readme()) if "://" not in t]
    return [tuple(t.split("#", 1)) if "#" in t else (t, "") for t in targets]


def test_ci_runs_the_readme_commands():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read().splitlines()
    readme = _readme().splitlines()
    marked = [line.split("# README: ", 1)[1] for line in ci if line.startswith("# README: ")]
    assert len(marked) == 2
    for command in marked:
        assert command in ci, f".ci/run does not run: {command}"
        assert command in readme, f"README.md does not show: {command}"


def test_readme_links_point_at_files():
    links = readme_links()
    assert len(links) >= 10, "the README should link into the docs pages"
    missing = sorted({path for path, _ in links if not os.path.exists(os.path.join(ROOT, path))})
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_readme_is_a_landing_page():
    # The rest lives in docs/ (mkdocs); a README that grows back is a page that was not moved.
    assert len(_readme().splitlines()) <= 300
