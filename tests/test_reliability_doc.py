"""docs/reliability.md cites tests that exist: every ``tests/….py::name`` in the fault table is a
test function of that file (a parametrised id ``name[case]`` counts as its function), every
``tests/….py`` a file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
CITATION = re.compile(r"`(tests/[\w/]+\.py)(?:::([\w\[\]\-.,= ]+))?`")


def citations(text: str) -> list[tuple[str, str | None]]:
    """The (file, test name or None) pairs cited in backticks, in order."""
    return [(m.group(1), m.group(2)) for m in CITATION.finditer(text)]


def defined_tests(path: Path) -> set[str]:
    """The names of a test file's module-level test functions and ``Class::method`` tests."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            }
    return {name for name in names if name.split("::")[-1].startswith("test")}


def unresolved(text: str, root: Path = ROOT) -> list[str]:
    """The citations in ``text`` that name no file, or no test function of their file."""
    missing = []
    for file, name in citations(text):
        path = root / file
        if not path.is_file():
            missing.append(file)
        elif name is not None and name.split("[", 1)[0] not in defined_tests(path):
            missing.append(f"{file}::{name}")
    return missing


def test_the_fault_table_cites_many_tests() -> None:
    cited = citations(DOC.read_text())
    assert len(cited) > 100, len(cited)  # the parser finds the table's citations
    assert all(name is None or name.startswith("test") for _, name in cited)


def test_every_test_cited_in_the_fault_table_exists() -> None:
    missing = unresolved(DOC.read_text())
    assert not missing, f"docs/reliability.md cites tests that do not exist: {missing}"


@pytest.mark.parametrize(
    ("line", "missing"),
    [
        ("| a | 1 | `tests/test_checkpoint.py::test_missing_file_and_directory` |", []),
        ("| a | 2 | `tests/test_config.py::test_bad_values_name_the_key[lr]` |", []),
        ("| a | 1 | `tests/training/test_setup_distributed.py` |", []),
        (
            "| a | 1 | `tests/test_checkpoint.py::test_missing_file_and_directories` |",
            ["tests/test_checkpoint.py::test_missing_file_and_directories"],
        ),
        ("| a | 1 | `tests/test_checkpoints.py::test_x` |", ["tests/test_checkpoints.py"]),
        (
            "| a | 1 | `tests/test_checkpoint.py::_DiskFills` |",  # exists, but is no test
            ["tests/test_checkpoint.py::_DiskFills"],
        ),
    ],
    ids=["test", "parametrised", "file", "misspelt-test", "misspelt-file", "not-a-test"],
)
def test_the_check_reports_what_does_not_resolve(line: str, missing: list[str]) -> None:
    """Negative cases: a misspelt test or file, or a helper cited as a test, is reported."""
    assert unresolved(line) == missing
