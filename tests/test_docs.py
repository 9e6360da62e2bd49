"""The README stays short and current; every link in the docs resolves; the layout page names every module."""

import re

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())  # a '#' line inside a code block is no heading
    return {slug(m) for m in re.findall(r"(?m)^#{1,6} (.+)$", text)}


def test_readme_is_short_and_holds_no_dated_measurement():
    text = (REPO / "README.md").read_text()
    assert text.count("\n") <= 300
    dates = re.findall(r"\b20\d\d-\d\d-\d\d\b", text)
    assert not dates, f"dated figures belong in docs/benchmarks.md or docs/results.md: {dates}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"(https?:|mailto:)", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def test_layout_page_names_every_product_module_and_no_other():
    text = (REPO / "docs" / "layout.md").read_text()
    named = set(re.findall(r"\b((?:distill|serve|export)/[\w/]+\.py)\b", text))
    modules = {
        str(p.relative_to(REPO)) for pkg in ("distill", "serve", "export") for p in (REPO / pkg).rglob("*.py") if p.name != "__init__.py"
    }
    assert not modules - named, f"docs/layout.md does not name: {sorted(modules - named)}"
    assert not named - modules, f"docs/layout.md names modules that are gone: {sorted(named - modules)}"
