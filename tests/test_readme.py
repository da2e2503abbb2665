"""The README's fault table: every row names tests, and every test it names exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fault_rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
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
            assert re.search(rf"^def {test}\(", source, re.M), f"{module}::{test} (README fault table)"
