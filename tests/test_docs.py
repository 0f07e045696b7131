"""Documentation: every relative link in docs/*.md and README.md points at a file that exists, and (heavy) the
mkdocs site builds with --strict."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

# [text](target), ![alt](target) and [label]: target. The target ends at whitespace or ")" (an optional "title"
# may follow); nested brackets in the text (e.g. `[`x`]`) are fine since only the "](" junction is matched.
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|//|#)", re.IGNORECASE)


def markdown_files() -> list[Path]:
    return sorted(DOCS.glob("*.md")) + [REPO / "README.md"]


def relative_links(text: str) -> list[str]:
    """Link targets of a Markdown text that point at files: not URLs, not in-page anchors, not inside code."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)
    return [target for target in targets if not EXTERNAL.match(target)]


def test_link_extraction_sees_links_and_skips_code_and_urls() -> None:
    text = (
        "See [a](a.md#part), ![pic](images/x.png \"title\") and [`c`](../c.py).\n"
        "[ref]: refs/d.md\n"
        "[web](https://example.org/e.md), [top](#top), [mail](mailto:x@y.z)\n"
        "`[no](code.md)`\n"
        "```\n[no](fenced.md)\n```\n"
    )
    assert relative_links(text) == ["a.md#part", "images/x.png", "../c.py", "refs/d.md"]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_relative_links_point_at_existing_files(path: Path) -> None:
    missing = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        file_part = target.split("#", 1)[0]
        if file_part and not (path.parent / file_part).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(REPO)} links to missing files: {missing}"


def test_every_docs_page_is_in_the_mkdocs_nav() -> None:
    # A page left out of the nav builds but cannot be reached from the site's menu.
    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", config, re.MULTILINE))
    pages = {path.name for path in DOCS.glob("*.md")}
    assert pages - listed == set(), f"docs pages missing from mkdocs.yml's nav: {sorted(pages - listed)}"
    assert listed - pages == set(), f"mkdocs.yml's nav lists missing pages: {sorted(listed - pages)}"


@pytest.mark.heavy
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[docs]')")
    mkdocs = shutil.which("mkdocs")
    command = [mkdocs] if mkdocs else [sys.executable, "-m", "mkdocs"]
    result = subprocess.run(
        [*command, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        # Material prints a banner about MkDocs 2.0 on every build; it is not a warning about these docs.
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    # The API page is generated from the docstrings, not left as ::: directives.
    assert 'id="pasam_hf.PASamModel"' in api and ":::" not in api
