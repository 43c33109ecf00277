"""The module map of docs/architecture.md is a layering: no module imports one from a higher layer.

Checked on the source (every `import` and `from ... import`, including imports inside functions), so
a lazy import that breaks the layering is caught too. The table below is the architecture doc's.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvnet

LAYERS: list[tuple[str, ...]] = [
    ("kvnet.errors",),
    ("kvnet.canonical", "kvnet.hashing"),
    ("kvnet.tokenizer", "kvnet.models", "kvnet.engine"),
    ("kvnet.chain",),
    ("kvnet.identity", "kvnet.manifest", "kvnet.receipts"),
    ("kvnet.artifact", "kvnet.pieces"),
    ("kvnet.store", "kvnet.store_index", "kvnet.store_files", "kvnet.store_writer", "kvnet.ledger",
     "kvnet.refusals"),
    ("kvnet.publish", "kvnet.reuse", "kvnet.exactness", "kvnet.audit", "kvnet.fraud"),
    ("kvnet.p2p.bulk_wire",),  # the bulk path's wire constants: nothing of the p2p machinery below them
    ("kvnet.p2p", "kvnet.p2p.stats"),  # the rest of kvnet.p2p, bulk_server and bulk_client included
    ("kvnet.logs",),  # stdlib only; below the daemon, which configures its handler
    ("kvnet.daemon",),  # kvnet-node: config, lock, metrics, scheduler, chat, openai_api, service, app, main
    ("kvnet.client", "kvnet.cli_node", "kvnet.cli_audit", "kvnet.cli"),
]
ROOT = Path(kvnet.__file__).parent


def _rank(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return i
    return None


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, name: str) -> set[str]:
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("kvnet")}


def test_every_module_is_in_the_map():
    unplaced = [m for m in _modules() if m != "kvnet" and _rank(m) is None]
    assert unplaced == [], f"add these to LAYERS and docs/architecture.md: {unplaced}"


def test_no_module_imports_a_higher_layer():
    bad = []
    for name, path in _modules().items():
        own = _rank(name)
        if own is None:
            continue
        for imported in _imports(path, name):
            rank = _rank(imported)
            if rank is not None and rank > own:
                bad.append(f"{name} imports {imported}")
    assert bad == []


def test_the_check_sees_a_violation(tmp_path):
    """The walker finds function-level imports, so the layering test can fail."""
    src = tmp_path / "store.py"
    src.write_text("def f():\n    from kvnet.p2p import node\n")
    assert "kvnet.p2p" in _imports(src, "kvnet.store")
