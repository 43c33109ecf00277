"""Docs name tests as evidence (docs/security.md, docs/upstream.md, ...): every one they name must exist.

A renamed or deleted test would otherwise leave a spec pointing at nothing. Checks each
`tests/<path>.py` and `tests/<path>.py::<name>` written in docs/*.md and the README.
"""

from __future__ import annotations

import ast
import re

import pytest

from tests.artifacts import ROOT

REF = re.compile(r"(tests/[\w/]+\.py)(?:::(\w+))?")
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def _refs() -> list[tuple[str, str, str | None]]:
    out = []
    for doc in DOCS:
        for m in REF.finditer(doc.read_text()):
            out.append((doc.name, m.group(1), m.group(2)))
    return sorted(set(out), key=lambda r: (r[0], r[1], r[2] or ""))


def _defined(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}


def test_docs_name_tests_at_all():
    assert len(_refs()) >= 10


@pytest.mark.parametrize(("doc", "path", "name"), _refs())
def test_every_test_a_doc_names_exists(doc, path, name):
    assert (ROOT / path).is_file(), f"{doc} names {path}, which does not exist"
    if name is not None:
        assert name in _defined(path), f"{doc} names {path}::{name}, which is not defined there"
