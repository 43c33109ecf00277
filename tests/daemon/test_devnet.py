"""`python -m devnet run --scenario basic`: real kvnet-node processes, a published document reused over
the network by every other node's agent, token-exact against that node's own full prefill, and a
clean teardown (no process, no socket file, no temp dir left)."""

from __future__ import annotations

import json
import signal
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
    assert agent["price_paid"] > 0 and agent["receipts_match"] and agent["channels_matched"] >= 1  # fee 10/MiB
    assert _devnet_dirs() == before


def test_ctrl_c_tears_the_devnet_down():
    before = _devnet_dirs()
    proc = subprocess.Popen([sys.executable, "-m", "devnet", "run", "--nodes", "2", "--scenario", "load"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    try:
        line = proc.stderr.readline()  # "devnet: 2 nodes up ...": the scenario is starting
        assert "nodes up" in line, line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: every node was stopped" in err
    assert _devnet_dirs() == before
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [p for p in ps.splitlines() if "kvnet-devnet-" in p and "kvnet.daemon.main" in p]
