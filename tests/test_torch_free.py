"""Storage and network code must not load torch or transformers.

A serving node only moves and verifies bytes; torch costs seconds of start-up and hundreds of MB per
process. Both checks use real processes: a fresh interpreter importing the modules, and a real
`kvnet serve` whose memory maps are inspected for torch's shared libraries.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvnet import identity
from tests.artifacts import ROOT, serve_process

TORCH_FREE = ["kvnet.store", "kvnet.manifest", "kvnet.pieces", "kvnet.p2p.node", "kvnet.p2p.commands",
              "kvnet.p2p.dht", "kvnet.p2p.fetcher", "kvnet.p2p.server", "kvnet.receipts",
              "kvnet.ledger", "kvnet.refusals", "kvnet.p2p.proofs", "kvnet.fraud"]


def test_storage_and_network_modules_import_without_torch():
    code = (f"import sys\nfor m in {TORCH_FREE!r}:\n    __import__(m)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_artifact_module_still_exports_the_piece_helpers():
    from kvnet import artifact, pieces

    assert artifact.ArtifactError is pieces.ArtifactError
    assert artifact.verify_piece is pieces.verify_piece and artifact.split_pieces is pieces.split_pieces


def _mapped_libraries(pid: int) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in maps if len(line.split()) >= 6}


def test_a_serving_node_does_not_load_torch(tmp_path):
    home = tmp_path / "S"
    identity.generate(home / "identity.key")
    proc, _ = serve_process(home)
    try:
        libs = _mapped_libraries(proc.pid)
        assert any("python" in p for p in libs)  # the maps were really read
        loaded = sorted(p for p in libs if "torch" in Path(p).name.lower() or "/torch/" in p)
        assert loaded == []
    finally:
        proc.terminate()
        proc.wait(10)
