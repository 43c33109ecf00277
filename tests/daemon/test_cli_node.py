"""`kvnet node ...` against a running node (the CLI goes through kvnet.client.Client), and the node's
loopback TCP listener, which needs the bearer token."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx

from kvnet.client import Client, NodeError, NodeUnreachable
from tests.daemon.conftest import TOKEN
from tests.daemon.nodes import ROOT

DOC = "The node CLI publishes this document for chat and then asks about it. " * 6


def kvnet(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kvnet.cli", "node", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_node_commands(node, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    sock = ["--socket", node.socket]
    status = json.loads(kvnet("status", *sock, "--json").stdout)
    assert status["peer_id"] == node.ready["peer_id"]
    pub = json.loads(kvnet("publish", str(doc), *sock, "--json").stdout)
    assert pub["for_chat"] is True
    listed = json.loads(kvnet("ls", *sock, "--json").stdout)["artifacts"]
    assert pub["manifest_id"] in [a["manifest_id"] for a in listed]
    ask = kvnet("ask", "--doc", str(doc), "What does the CLI do?", *sock, "--max-tokens", "4")
    assert ask.returncode == 0, ask.stderr
    assert f"cached_tokens {pub['n_tokens']}" in ask.stderr
    assert kvnet("peers", *sock, "--json").returncode == 0
    fetch = kvnet("fetch", *sock, "--manifest", pub["manifest_id"])  # no peers: one error line
    assert fetch.returncode == 1 and fetch.stderr.strip().splitlines() == [
        "error: node answered 409: this node has no peers to fetch from (check bootstrap in node.toml)"]
    gone = kvnet("status", "--socket", str(tmp_path / "none.sock"))
    assert gone.returncode == 1 and len(gone.stderr.strip().splitlines()) == 1 and "is it running" in gone.stderr


def test_client_errors(node, tmp_path):
    with Client(node.socket) as c:
        assert c.default_model() == "tiny"
        try:
            c.chat([{"role": "user", "content": "x"}], model="nope")
        except NodeError as exc:
            assert exc.status == 404 and exc.code == "model_not_found"
        else:
            raise AssertionError("unknown model accepted")
        events = list(c.stream("/v1/completions", {"model": "tiny", "prompt": "abc", "max_tokens": 3}))
        assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    with Client(tmp_path / "absent.sock") as c:
        try:
            c.status()
        except NodeUnreachable:
            pass
        else:
            raise AssertionError("no node, no error")


def test_tcp_listener_needs_the_bearer_token(node):
    url = f"http://127.0.0.1:{node.tcp_port}/v1/status"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).json()["error"]["code"] == \
        "invalid_api_key"
    ok = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["peer_id"] == node.ready["peer_id"]
