"""`python -m devnet run --scenario basic`: real kvnet-node processes, a published document reused over
the network by every other node's agent, token-exact against that node's own full prefill, and a
clean teardown (no process, no socket file, no temp dir left)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.daemon.nodes import ROOT, env


def _devnet_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("kvnet-devnet-*")}


def test_basic_devnet_two_nodes():
    before = _devnet_dirs()
    r = subprocess.run([sys.executable, "-m", "devnet", "run", "--nodes", "2", "--scenario", "basic",
                        "--doc-bytes", "600", "--json"], capture_output=True, text=True, env=env(), cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["leftovers"] == []
    [agent] = report["agents"]
    assert agent["cached_tokens"] == report["document_tokens"] > 600
    assert agent["source"] == "network" and agent["exact"] and agent["bytes_fetched"] > 0
    assert _devnet_dirs() == before
