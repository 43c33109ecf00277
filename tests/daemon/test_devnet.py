"""`python -m devnet run`: real kvnet-node processes (and, for byzantine, real liar processes), the
scenario's checks, and a clean teardown (no process, no socket file, no temp dir left), also after Ctrl-C.

CI runs the README's main job here: the 3-node `basic` devnet on the tiny model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from tests.daemon.nodes import ROOT, env

DEVNET_TIMEOUT_S = 240  # a bound on a hung devnet, far above its run time: not a timing check


def _left_behind(tmp: str) -> list[str]:
    """What remains of one devnet (other devnets may run on the same machine): its dir, its processes."""
    assert Path(tmp).name.startswith("kvnet-devnet-"), tmp
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [tmp] * Path(tmp).exists() + [p for p in ps.splitlines() if tmp in p]


def _run(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "devnet", "run", *args, "--json"], capture_output=True, text=True,
                       env=env(), cwd=ROOT, timeout=DEVNET_TIMEOUT_S)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["leftovers"] == []
    assert _left_behind(report["dir"]) == []
    return report


def test_basic_devnet_three_nodes():
    """The README's main job: node0 publishes; node1's and node2's agents each reuse the document's KV
    from the network, token-exact against their own full prefill."""
    report = _run("--nodes", "3", "--scenario", "basic", "--doc-bytes", "600")
    assert [a["node"] for a in report["agents"]] == ["node1", "node2"]
    for agent in report["agents"]:
        assert agent["cached_tokens"] == report["document_tokens"] > 600
        assert agent["source"] == "network" and agent["exact"] and agent["bytes_fetched"] > 0
        assert agent["providers"]
        assert agent["price_paid"] > 0 and agent["receipts_match"] and agent["channels_matched"] >= 1  # fee 10/MiB


def test_byzantine_devnet_liars_are_caught():
    """A node serving corrupt pieces and three liar processes (forged manifest, foreign manifest for the
    document's keys, phantom pieces): the agent's answer is exact with the whole document cached, no
    byte came from any of them, and its node scored the corrupt node and the forged and foreign liars
    below 0, and phantom below 0 whenever a fetch asked it for pieces. When a lookup ends at the phantom's
    offer alone (it verifies: the real manifest), the fetch fails there and looks the manifest up again
    without it (Node.fetch, tests/p2p/test_relookup.py), so the answer still comes from the network."""
    report = _run("--nodes", "3", "--scenario", "byzantine", "--doc-bytes", "3000")
    assert set(report["liars"]) == {"forged", "foreign", "phantom"}
    assert report["unscored_lies"] == []
    assert report["corrupt_node_itself"]["load_error"] and report["corrupt_node_itself"]["exact"]
    [agent] = report["agents"]
    assert agent["exact"] and agent["cached_tokens"] == report["document_tokens"] and agent["source"] == "network"
    assert agent["liars_supplied"] == [] and not agent["corrupt_provider_supplied"]
    assert agent["liar_scores"]["forged"] < 0 and agent["liar_scores"]["foreign"] < 0
    if "phantom" in agent["liars_in_fetch"]:  # asked for pieces, served none: scored `phantom`
        assert agent["liar_scores"]["phantom"] < 0
    assert set(agent["providers"]).isdisjoint(report["liars"].values())


def test_ctrl_c_tears_the_devnet_down():
    proc = subprocess.Popen([sys.executable, "-m", "devnet", "run", "--nodes", "2", "--scenario", "load"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    try:
        line = proc.stderr.readline()  # "devnet: 2 nodes up ...": the scenario is starting
        assert "nodes up" in line, line
        tmp = line.split(" in ", 1)[1].split(";", 1)[0]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: every node was stopped" in err
    assert _left_behind(tmp) == []
