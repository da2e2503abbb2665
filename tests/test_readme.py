"""The documentation: every relative link of the README and docs/ resolves, and every row of the fault
table (docs/training.md) names tests that exist."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchors(document: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as -."""
    headings = re.findall(r"^#+ (.+)$", document.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        assert linked.exists(), f"{document.name}: {target} is not there"
        if anchor:
            assert anchor in heading_anchors(linked), f"{document.name}: {target} names no heading of {path}"


def fault_rows() -> list[str]:
    text = (ROOT / "docs" / "training.md").read_text()
    table = text.split("## Faults and bad inputs", 1)[1].split("\n## ", 1)[0]
    return [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| fault")]


def test_every_row_of_the_fault_table_names_tests_that_exist():
    rows = fault_rows()
    assert len(rows) >= 15
    for row in rows:
        module, named = None, []
        for reference in re.findall(r"`((?:test_\w+)?::test_\w+)`", row.split(" | ")[-1]):
            file, test = reference.split("::")
            module = file or module                     # `::test_x` is in the module named before it
            named.append((module, test))
        assert named, row
        for module, test in named:
            source = (ROOT / "tests" / f"{module}.py").read_text()
            assert re.search(rf"^def {test}\(", source, re.M), f"{module}::{test} (docs/training.md fault table)"
