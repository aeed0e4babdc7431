"""The documentation: the README stays a front page, docs/ builds with `mkdocs build
--strict` (a broken link or a page missing from the navigation fails), and the settings
reference is what scripts/settings_doc.py generates from the settings model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

MAX_README_LINES = 300


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= MAX_README_LINES
    assert "make serve" in readme and "make test" in readme
    # Every link of the README to the repository points at a file that exists.
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target


def test_the_docs_build_strictly(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict",
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "settings" / "index.html").is_file()


def test_every_page_is_in_the_navigation():
    config = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    missing = [p for p in pages if f": {p}" not in config]
    assert not missing, missing


def test_the_settings_reference_matches_the_settings_model(tmp_path):
    page = tmp_path / "settings.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "settings_doc.py"), str(page)],
                   check=True, capture_output=True, timeout=120)
    assert page.read_text() == (ROOT / "docs" / "settings.md").read_text(), (
        "docs/settings.md is stale: run make docs")
