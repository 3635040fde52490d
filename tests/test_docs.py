"""The documentation site builds with ``mkdocs build --strict``: no broken link, anchor or API entry.

mkdocs.yml turns missing pages, missing anchors and docstring parameters the signature lacks
into warnings, and ``--strict`` makes a warning fail the build. CI installs mkdocs with the
``test`` extra; without it these tests skip.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .test_readme import readme_links

# Module fixtures (site: the built docs) are built once per process: under
# `pytest -n`, these tests stay on one worker.
pytestmark = pytest.mark.xdist_group("docs")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Named by the issue as the public entry points the API reference documents.
ENTRY_POINTS = ("to_local", "load", "LocalNet", "train", "TrainConfig", "cost_report", "count_flops",
                "solve_budget", "measure_memory", "block_cka", "linear_probe", "AugLocalError")


def build(site_dir):
    """``mkdocs build --strict`` into ``site_dir``; returns the completed process."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs")
    site_dir = tmp_path_factory.mktemp("site")
    result = build(site_dir)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
    return site_dir


def page_html(site, md_path):
    """The built HTML of ``docs/<md_path>`` (mkdocs' directory URLs: ``a/b.md`` -> ``a/b/index.html``)."""
    stem = Path(md_path).with_suffix("")
    return (site / ("index.html" if stem.name == "index" else stem / "index.html")).read_text()


def test_docs_build_strict(site):
    assert (site / "index.html").exists()


def test_readme_anchors_exist_in_the_docs(site):
    anchored = [(path, anchor) for path, anchor in readme_links() if anchor]
    assert anchored
    for path, anchor in anchored:
        assert path.startswith("docs/") and path.endswith(".md"), path
        html = page_html(site, path[len("docs/"):])
        assert f'id="{anchor}"' in html, f"README.md links to {path}#{anchor}, a heading that does not exist"


def test_every_image_is_shown(site):
    pages = "".join(p.read_text() for p in DOCS.rglob("*.md"))
    shown = set(re.findall(r"!\[[^\]]*\]\((?:\.\./)*([^)\s]+\.png)\)", pages))
    images = {p.name for p in DOCS.glob("*.png")}
    assert images <= shown, f"images in docs/ that no page shows: {sorted(images - shown)}"


def test_api_reference_documents_the_entry_points(site):
    html = page_html(site, "api.md")
    documented = set(re.findall(r'id="auglocal_fx\.(?:[a-z_]+\.)?([A-Za-z_]+)"', html))
    missing = [name for name in ENTRY_POINTS if name not in documented]
    assert not missing, f"docs/api.md does not document: {missing}"
